"""What a finished train.py run still holds on the GPU: the allocations alive after the sweep's cleanup.

    python scripts/memory_leftover_trace.py --model vit-large --config 64,1,0,1,bf16 --out DIR

scripts/sweep_single_gpu.py runs many configurations in one process, and a ZeRO-1 run left 1-4 GB allocated
that the next configuration counted as its own peak (one H200, profiles/h200/runs/s12/c). This runs one
configuration the way the sweep does (its run_one, then its cleanup) under
torch.cuda.memory._record_memory_history and writes
  DIR/leftover.json  the bytes still allocated, grouped by the allocating source line (with the full stack
                     of each group's largest block), and the CUDA tensors Python's gc can still reach, with
                     the types of the objects that refer to them
  DIR/leftover.txt   the same as text
Needs CUDA.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.memory_peak_trace import MB, short, site  # noqa: E402


def parse_config(text: str) -> dict:
    """'bsz,chunks,ckpt,zero,precision' -> the sweep's config dict; ValueError naming the problem."""
    parts = text.split(",")
    if len(parts) != 5:
        raise ValueError(f"--config {text}: give bsz,chunks,ckpt,zero,precision (e.g. 64,1,0,1,bf16)")
    try:
        bsz, chunks, ckpt, zero = (int(x) for x in parts[:4])
    except ValueError:
        raise ValueError(f"--config {text}: bsz, chunks, ckpt and zero must be integers") from None
    return dict(bsz=bsz, chunks=chunks, ckpt=ckpt, zero=zero, precision=parts[4])


def live_blocks(snapshot: dict, device: int) -> list[dict]:
    """The snapshot's allocated blocks on `device`: size and allocating stack."""
    return [{"size": b["size"], "frames": b.get("frames") or []}
            for seg in snapshot["segments"] if seg.get("device", device) == device
            for b in seg["blocks"] if b["state"] == "active_allocated"]


def by_site(blocks: list[dict]) -> list[dict]:
    """Blocks grouped by allocating site, largest total first, each with its largest block's stack."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in blocks:
        groups[site(b["frames"])].append(b)
    out = []
    for where, bs in groups.items():
        top = max(bs, key=lambda b: b["size"])
        out.append({"site": where, "mb": sum(b["size"] for b in bs) / MB, "blocks": len(bs),
                    "largest_stack": [short(f) for f in top["frames"][:25]]})
    return sorted(out, key=lambda g: -g["mb"])


def reachable_cuda_tensors(limit: int = 20) -> list[dict]:
    """CUDA tensors gc can reach, largest first, with the types of their referrers (two levels)."""
    import torch

    found = []
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.is_cuda:
                found.append(obj)
        except Exception:  # noqa: BLE001 - some objects raise on attribute access
            continue
    found.sort(key=lambda t: -t.untyped_storage().nbytes())
    out = []
    for t in found[:limit]:
        refs = [r for r in gc.get_referrers(t) if r is not found]
        second = [type(rr).__name__ for r in refs[:5] for rr in gc.get_referrers(r)[:5] if rr is not refs]
        out.append({"mb": t.untyped_storage().nbytes() / MB, "shape": list(t.shape), "dtype": str(t.dtype),
                    "referrers": [type(r).__name__ for r in refs[:10]], "referrers_of_referrers": second[:20]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", required=True, help="bsz,chunks,ckpt,zero,precision, e.g. 64,1,0,1,bf16")
    ap.add_argument("--after", default="", help="configurations run first in this process, untraced, ';'-separated "
                    "(the sweep's leftover showed only after earlier runs)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-entries", type=int, default=1_000_000, help="allocator events kept (the last ones)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: the allocator trace needs a CUDA device; run this on a GPU", file=sys.stderr)
        return 2
    try:
        cfg = parse_config(args.config)
        earlier = [parse_config(c) for c in args.after.split(";") if c]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29537")
    from model_zoo import get_model_spec
    from scripts.sweep_single_gpu import run_one

    os.makedirs(args.out, exist_ok=True)
    n = get_model_spec(args.model).num_layers
    for c in earlier:
        r = run_one(args.model, c, args.steps, n)
        print(f"[leftover] earlier run {c}: allocated {torch.cuda.memory_allocated() / MB:.0f} MB after it "
              f"({r.get('error') or 'ok'})", flush=True)
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=args.max_entries, stacks="python")
    rec = run_one(args.model, cfg, args.steps, n)
    gc.collect()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    groups = by_site(live_blocks(snap, torch.cuda.current_device()))
    result = {"model": args.model, "config": cfg, "after": earlier, "run": {k: rec.get(k) for k in ("rc", "error", "measured")},
              "allocated_before_mb": before / MB, "allocated_after_mb": torch.cuda.memory_allocated() / MB,
              "leftover_by_site": groups, "gc_reachable_cuda_tensors": reachable_cuda_tensors()}
    tmp = os.path.join(args.out, "leftover.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "leftover.json"))
    lines = [f"{args.model} {cfg}: allocated {result['allocated_after_mb']:.0f} MB after the run and cleanup "
             f"({result['allocated_before_mb']:.0f} MB before)"]
    for g in groups[:15]:
        lines.append(f"{g['mb']:10.1f} MB {g['blocks']:6d} blocks  {g['site']}")
        lines += [f"{'':20s}{s}" for s in g["largest_stack"][:12]]
    lines.append(f"gc-reachable CUDA tensors: {len(result['gc_reachable_cuda_tensors'])} (largest first)")
    lines += [f"  {t['mb']:.1f} MB {t['dtype']} {t['shape']} <- {t['referrers']} <- {t['referrers_of_referrers']}"
              for t in result["gc_reachable_cuda_tensors"]]
    with open(os.path.join(args.out, "leftover.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
