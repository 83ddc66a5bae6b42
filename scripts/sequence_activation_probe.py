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
    """One forward of the sequence, entry by entry: rows of {entry, kind, module, saved_mb, alloc_mb, largest}
    (kind: embed, layer, head, loss)."""
    from autotune.profile_engine import one_rank_net
    from model_zoo.accounting import saved_tensors

    net, seq, make_batch = one_rank_net(model, None, precision, seed)
    x, labels = make_batch(batch)
    cuda = labels.device.type == "cuda"
    alloc = lambda: torch.cuda.memory_allocated() if cuda else 0  # noqa: E731
    seen: set = set()               # storages already charged to an earlier entry
    rows = []

    def run(kind: str, name: str, fn, *args):
        before = alloc()
        storages, out = saved_tensors(fn, *args, exclude=net.parameters())
        mine = [st for st in storages if st.key not in seen]
        seen.update(st.key for st in mine)
        rows.append({"entry": len(rows), "kind": kind, "module": name, "alloc_mb": (alloc() - before) / MB,
                     "saved_mb": sum(st.nbytes for st in mine) / MB,
                     "largest": [f"{str(st.dtype).replace('torch.', '')}{list(st.shape)} {st.nbytes / MB:.1f}"
                                 for st in sorted(mine, key=lambda st: -st.nbytes)[:4]]})
        return out

    start = alloc()
    kinds = ["embed"] * len(seq.embed) + ["layer"] * len(seq.layers) + ["head"] * len(seq.head)
    for kind, m in zip(kinds, net.entries):
        x = run(kind, type(getattr(m, "inner", m)).__name__, m, x)
    loss = run("loss", "loss", net.loss_fn, x, labels)
    total = {"saved_mb": sum(r["saved_mb"] for r in rows), "alloc_mb": (alloc() - start) / MB, "loss": loss.item()}
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
