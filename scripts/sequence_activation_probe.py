"""Where a model's activations go inside train.py's layer sequence, next to its profile's per-layer numbers.

    python scripts/sequence_activation_probe.py --model t5-large --batch 8 --profile profiles/h100/t5-large.json

Builds the sequence exactly as train.py does (one rank, no checkpointing), runs one forward entry by entry
and counts the storages autograd saves for backward, each once across the whole sequence (a tensor saved by
several layers belongs to the first), plus the allocator's growth per entry on a GPU. Per entry it prints
the saved MB, the allocator's MB, what the profile predicts for that layer (act_fixed + act per sample x
batch) and the largest saved tensors. The profile measures each layer alone; this shows what the full
sequence adds (why T5-large on a GPU holds more than its profile says, for one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

MB = 2 ** 20


def probe(model: str, batch: int, precision: str, seed: int = 1234) -> tuple[list[dict], dict]:
    import train
    from autotune.plan import Plan
    from autotune.profile_engine import _sequence
    from backends.data import SyntheticData
    from backends.deepspeed.engine import _to, device
    from backends.deepspeed.layers import SequentialWithLoss
    from backends.megatron.groups import build_parallel_groups, init_distributed
    from backends.megatron.random import seed_everything
    from model_zoo.common import TORCH_DTYPES

    init_distributed()
    choice = train.resolve_model(model, None, None)
    dev, dtype = device(), TORCH_DTYPES[precision]
    from model_zoo.runtime import get_adapter
    plan = Plan.uniform(num_layers=get_adapter(choice.family).num_layers(choice.config), world_size=1,
                        global_bsz=batch, precision=precision, model={"name": model})
    groups = build_parallel_groups(plan)
    seed_everything(seed, groups.rng_rank, groups.pp_rank)
    adapter, seq = _sequence(choice, groups, seed)
    net = SequentialWithLoss(seq, [0] * seq.num_layers).to(dev, dtype=dtype).train()
    own = {p.untyped_storage().data_ptr() for p in net.parameters()}
    inputs, labels = SyntheticData(adapter, choice.config, choice.task, plan, 0, seed,
                                   seq_len=choice.seq_len).micro_batches(0)[0]
    x, labels = _to(inputs, dev, dtype), _to(labels, dev)
    found: dict[tuple, tuple] = {}          # storage -> (entry index, bytes, shape, dtype)
    keep: list[torch.Tensor] = []
    current = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key[1] not in own and key not in found:
            found[key] = (current[0], t.untyped_storage().nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""))
            keep.append(t)
        return t.detach()

    cuda = dev.type == "cuda"
    alloc = lambda: torch.cuda.memory_allocated() if cuda else 0  # noqa: E731
    rows = []
    start = alloc()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for i, m in enumerate(net.entries):
            current[0] = i
            before = alloc()
            x = m(x)
            rows.append({"entry": i, "module": type(getattr(m, "inner", m)).__name__, "alloc_mb": (alloc() - before) / MB})
        current[0] = len(net.entries)
        before = alloc()
        loss = net.loss_fn(x, labels)
        rows.append({"entry": len(net.entries), "module": "loss", "alloc_mb": (alloc() - before) / MB})
    for r in rows:
        mine = [v for v in found.values() if v[0] == r["entry"]]
        r["saved_mb"] = sum(v[1] for v in mine) / MB
        r["largest"] = [f"{v[3]}{list(v[2])} {v[1] / MB:.1f}" for v in sorted(mine, key=lambda v: -v[1])[:4]]
    total = {"saved_mb": sum(v[1] for v in found.values()) / MB, "alloc_mb": (alloc() - start) / MB,
             "loss": loss.item()}
    return rows, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--profile", default=None, help="model profile to compare per layer")
    ap.add_argument("--out", default=None, help="JSON with every row")
    args = ap.parse_args(argv)
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    rows, total = probe(args.model, args.batch, precision)
    expect = {}
    if args.profile:
        from autotune.model_profile import ModelProfile

        prof = ModelProfile.load(args.profile)
        raw = json.load(open(args.profile))["layer_types"]
        for name, lt in raw.items():
            e = lt["tp"]["1"]
            expect[name] = (e.get("act_fixed_bytes", 0) + prof.act_bytes(name, 1, False) * args.batch) / MB
    names = list(expect)
    print(f"{args.model} batch {args.batch} {precision}: saved {total['saved_mb']:.1f} MB, allocator "
          f"+{total['alloc_mb']:.1f} MB over the forward; profile per layer: "
          + ", ".join(f"{n} {v:.1f} MB" for n, v in expect.items()))
    for r in rows:
        print(f"  {r['entry']:3d} {r['module']:<22} saved {r['saved_mb']:8.1f}  alloc {r['alloc_mb']:8.1f}  "
              + "; ".join(r["largest"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "precision": precision, "rows": rows,
                       "total": total, "profile_layer_mb": expect, "layer_types": names}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
