"""Checks of the per-layer TP activation redistribution alone, on 4 gloo ranks (one stage, B = 4).

The global micro-batch is X = [x_0, x_1, x_2, x_3] (fine slice j = one sample, x_j = 10 j + feature).
A rank in layout (t, consecutive) holds the samples of its TP group's members, in group order. For
each layout change below the forward output must be the new group's samples, and the backward of an
upstream gradient G (identical on the new group's members, as TP layers leave it: sample k's gradient
is g_k = 100 + k) must be, on each old-group member, g_k * t_new / t_old for every sample k of the old
group. Run by tests/test_layerwise_runtime.py; exits non-zero on the first mismatch.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from backends.megatron.groups import init_distributed
from backends.megatron.layerwise import Layout, LayerwiseLayout, Relayout, Side, build_rank_groups, side

B = 4
FEATURES = 3
CHANGES = [  # (old layout, new layout); None = the fine-slice layout of a pipeline stage boundary
    (Layout(2, True), Layout(2, False)),
    (None, Layout(4, True)),
    (Layout(4, True), Layout(2, True)),
    (Layout(1, True), Layout(2, False)),
    (Layout(2, False), None),
    (Layout(4, True), Layout(1, True)),
]


def samples(ks: list[int], base: float) -> torch.Tensor:
    return torch.stack([base + 10.0 * k + torch.arange(FEATURES, dtype=torch.float64) for k in ks])


def held(layout: Layout | None, j: int) -> list[int]:
    return [j] if layout is None else layout.members(j, B)


def main() -> int:
    init_distributed()
    j = dist.get_rank()
    layouts = tuple({x for pair in CHANGES for x in pair if x is not None})
    lw = LayerwiseLayout(world=B, pp=1, layers=layouts, vocab=Layout(1, True), stage_of_layer=(0,) * len(layouts))
    rg = build_rank_groups(lw, j)
    failures = []
    for old, new in CHANGES:
        move = Relayout(torch.nn.Identity(), fine=1, before=(side(rg, old), side(rg, new)))
        x = samples(held(old, j), 0.0).requires_grad_(True)
        mask = torch.tensor(held(old, j))                    # an integer tensor riding along
        y, m = move((x, mask))
        expect_y = samples(held(new, j), 0.0)
        y.backward(samples(held(new, j), 100.0))
        t_old, t_new = len(held(old, j)), len(held(new, j))
        expect_g = samples(held(old, j), 100.0) * (t_new / t_old)
        if not (torch.equal(y, expect_y) and torch.equal(m, torch.tensor(held(new, j)))
                and torch.equal(x.grad, expect_g)):
            failures.append(f"rank {j} {old} -> {new}: y {y[:, 0].tolist()} (want {expect_y[:, 0].tolist()}), "
                            f"grad {x.grad[:, 0].tolist()} (want {expect_g[:, 0].tolist()})")
    try:
        Relayout(torch.nn.Identity(), fine=1, before=(Side(None, 1, 0), side(rg, Layout(2, True))))(
            (torch.zeros(1, FEATURES), torch.zeros(2, 2)))
        failures.append("a tensor without the batch in dim 0 was re-laid out")
    except RuntimeError as e:
        if "dim 0 (the batch)" not in str(e):
            failures.append(f"unexpected error: {e}")
    for f in failures:
        print(f, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
