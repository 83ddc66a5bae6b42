"""Measure each layer's and the head's backward workspace on the GPU into the model profile.

    python autotune/profile_workspace.py --model bert-large --model-profile profiles/h100/bert-large.json

While a piece runs backward the device holds more than its saved activations: the gradients of its
intermediate tensors in flight and, for a checkpointed layer, the activations recomputed for it. The
cost model's activation phase (autotune/search.py stage_memory) adds that workspace for the piece in
backward; without a measurement it takes the piece's full activations. This runs each layer type at
TP 1 with profile_model's builders (what one GPU runs), and the head + loss inside train.py's own
layer sequence, at two micro-batch sizes (--batches, default 8 and 32: between 4 and 8, as before session 7, fixed
parts and the allocator's block rounding bent the slope; T5-large's checkpointed encoder layer came out
at 37.5 MB/sample there against 42.3 in a traced batch-64 run), and records the allocator's peak during
the backward above what was allocated when it started (saved activations, output, its gradient), less
the parameter gradients it leaves behind (the cost model counts those apart), per sample (slope
between the sizes):
  bwd_workspace_bytes                    plain layer, and the head ('other.last', vtp 1)
  ckpt_bwd_workspace_bytes               checkpointed, reentrant recompute (what pp = 1 runs)
  ckpt_nonreentrant_bwd_workspace_bytes  checkpointed, non-reentrant recompute (pipeline stages)
Needs CUDA (allocator statistics).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from autotune.model_profile import ModelProfile, ProfileError  # noqa: E402

BATCHES = (8, 32)


CKPT_MODES = {"bwd_workspace_bytes": None, "ckpt_bwd_workspace_bytes": True,
              "ckpt_nonreentrant_bwd_workspace_bytes": False}   # field -> use_reentrant (None: no checkpoint)


def _peak_above_start(run_backward, device: torch.device, params) -> int:
    """Allocator peak during run_backward() above the memory allocated when it starts, less the gradients
    it leaves on `params`."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak - start - sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)


def layer_workspace(layer: torch.nn.Module, inputs: tuple, reentrant: bool | None, device: torch.device) -> int:
    """Workspace bytes of one backward of `layer` on `inputs` (checkpointed unless `reentrant` is None)."""
    fn = layer if reentrant is None else (lambda *a: checkpoint(layer, *a, use_reentrant=reentrant))
    layer.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[device]):
        out = fn(*inputs)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
            if isinstance(o, torch.Tensor) and o.requires_grad]
    grads = [torch.ones_like(o) for o in outs]
    got = _peak_above_start(lambda: torch.autograd.backward(outs, grads), device, list(layer.parameters()))
    layer.zero_grad(set_to_none=True)
    for x in inputs:
        if isinstance(x, torch.Tensor):
            x.grad = None
    return got


def head_workspace(model: str, task: str | None, precision: str, batches, seed: int = 1234) -> dict[int, int]:
    """{micro-batch: workspace bytes} of the head + loss, run inside train.py's layer sequence: the
    entries before the head under no_grad, their output made a leaf, then head, loss and backward."""
    from autotune.profile_engine import one_rank_net
    from backends.megatron.groups import destroy_parallel_groups

    net, seq, batch = one_rank_net(model, task, precision, seed)
    entries = list(net.entries)
    body, head = entries[:-len(seq.head)], entries[-len(seq.head):]
    head_params = [p for m in head for p in m.parameters()]
    leaf = lambda t: t.detach().requires_grad_(t.is_floating_point()) if torch.is_tensor(t) else t  # noqa: E731
    out = {}
    for b in (batches[0], *batches):          # the first run untimed (one-time buffers), overwritten
        x, labels = batch(b)
        with torch.no_grad():
            for m in body:
                x = m(x)
        x = tuple(leaf(t) for t in x) if isinstance(x, tuple) else leaf(x)
        for m in head:
            x = m(x)
        out[b] = _peak_above_start(net.loss_fn(x, labels).backward, labels.device, head_params)
        for p in head_params:
            p.grad = None
    del net, seq, head, body, entries, head_params
    destroy_parallel_groups()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def measure(model: str, profile: ModelProfile, progress=print, batches: tuple[int, int] = BATCHES
            ) -> tuple[dict[str, dict], dict]:
    """({layer type: raw fields} at TP 1, raw fields of the head) in the profile's precision."""
    from autotune import profile_model as pm
    from model_zoo.registry import get_model_spec, load_hf_config

    device = torch.device("cuda")
    config = load_hf_config(model)
    spec = get_model_spec(model, profile.precision, None, profile.task, device="cuda")
    spec_mod = pm.family_spec(spec.family)
    opts = pm.Options(device=device, precision=profile.precision, batch_sizes=list(batches), tps=[1], warmup=0,
                      reps=1, other_reps=1, act_batches=batches, check_batch=batches[-1],
                      seq_len=pm.layer_seq_len(model, None), do_other=False, layer_types=None)
    b1, b2 = batches
    method = ("torch.cuda.max_memory_allocated during one backward above memory_allocated at its start, less "
              f"the parameter gradients; slope between micro-batch sizes {b1} and {b2}")
    layers = {}
    for job in pm.layer_jobs(spec, config, spec_mod, opts, []):
        layer = pm.build_layer(spec_mod, job, opts)
        got = {}
        for field, mode in CKPT_MODES.items():
            # the first backward of a mode also allocates one-time buffers (library workspaces, RNG state):
            # an untimed one first, so they do not enter the small batch's number and bend the slope
            layer_workspace(layer, pm.make_inputs(spec_mod, job, b1, opts), mode, device)
            got[field] = {b: layer_workspace(layer, pm.make_inputs(spec_mod, job, b, opts), mode, device)
                          for b in batches}
        fields = {f: max(0, pm.per_sample(b1, v[b1], b2, v[b2])[0]) for f, v in got.items()}
        layers[job.type_name] = {**fields, "workspace_measured": {
            "method": method, "bytes": {f: {str(b): x for b, x in v.items()} for f, v in got.items()}}}
        progress(f"{job.type_name}: backward workspace {fields['bwd_workspace_bytes'] / 2**20:.2f} MB/sample, "
                 f"checkpointed {fields['ckpt_bwd_workspace_bytes'] / 2**20:.2f} (non-reentrant "
                 f"{fields['ckpt_nonreentrant_bwd_workspace_bytes'] / 2**20:.2f}); saved activations "
                 f"{(profile.act_bytes(job.type_name, 1, False) or 0) / 2**20:.2f} MB/sample")
        del layer
        torch.cuda.empty_cache()
    got = head_workspace(model, profile.task, profile.precision, batches)
    head = {"bwd_workspace_bytes": max(0, pm.per_sample(b1, got[b1], b2, got[b2])[0]),
            "workspace_measured": {"method": method + "; head + loss inside train.py's layer sequence",
                                   "bytes": {str(b): x for b, x in got.items()}}}
    progress(f"head + loss: backward workspace {head['bwd_workspace_bytes'] / 2**20:.2f} MB/sample, saved "
             f"activations {(profile.other_act_bytes('last', 1) or 0) / 2**20:.2f} MB/sample")
    return layers, head


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="preset name, HF config .json or checkpoint folder")
    ap.add_argument("--model-profile", required=True, help="profile whose tp=1 layer entries get the workspace")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)),
                    help="two micro-batch sizes, small then large; the slope between them is stored per sample")
    args = ap.parse_args(argv)
    try:
        batches = tuple(int(x) for x in args.batches.split(","))
        if len(batches) != 2 or not 0 < batches[0] < batches[1]:
            raise ValueError
    except ValueError:
        print(f"error: --batches {args.batches}: give two increasing micro-batch sizes, e.g. 8,32", file=sys.stderr)
        return 2
    try:
        if not torch.cuda.is_available():
            raise ValueError("the backward workspace is read from the CUDA allocator: run this on a GPU")
        profile = ModelProfile.load(args.model_profile)
        missing = [n for n, lt in profile.layer_types.items() if 1 not in lt.tp]
        if missing:
            raise ValueError(f"{args.model_profile} has no tp=1 entry for {', '.join(missing)}; profile tp 1 first "
                             f"(autotune/profile_model.py --tp 1,...)")
    except (ProfileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    layers, head = measure(args.model, profile,
                           progress=lambda s: print(f"[profile_workspace {args.model}] {s}", flush=True),
                           batches=batches)
    for name, fields in layers.items():
        if name in profile.layer_types:
            profile.layer_types[name].tp[1].raw.update(fields)
    if 1 in profile.other.get("last", {}):
        profile.other["last"][1].raw.update(head)
    profile.source["workspace"] = (f"{time.strftime('%Y-%m-%d')}: `python autotune/profile_workspace.py "
                                   f"{' '.join(sys.argv[1:])}` ({time.perf_counter() - t0:.0f} s, "
                                   f"{torch.cuda.get_device_name()})")
    profile.save(args.model_profile)
    print(f"wrote backward workspaces into {args.model_profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
