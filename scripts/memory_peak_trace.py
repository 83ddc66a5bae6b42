"""Where a train.py run's peak memory goes: the live allocations at the allocator's peak, by source line.

    python scripts/memory_peak_trace.py --model t5-large --galvatron-plan plan.json --steps 2 --out DIR

Runs train.py's own code path in this process (as scripts/sweep_single_gpu.py does) under
torch.cuda.memory._record_memory_history, takes a snapshot at the end, replays the allocator's events
backwards from the snapshot's live blocks to the moment of the highest allocated total, and writes
  DIR/peak.json  the peak, the cost model's prediction for the plan part by part, and the live bytes
                 grouped by the innermost frame from this repository or from transformers/deepspeed
  DIR/peak.txt   the same as a table
What the model's breakdown (stage_memory) calls activations, transient and gradients can then be set
against what the allocator held. Needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MB = 2 ** 20
# Frames worth naming, innermost first: this repository's code, then the libraries that allocate for it.
OWN = ("model_zoo/", "backends/", "autotune/", "train.py")
LIBS = ("transformers/models/", "deepspeed/", "torch/utils/checkpoint", "torch/optim/")


def short(f: dict) -> str:
    name = f.get("filename", "?")
    pkg = next((k for k in ("transformers/", "deepspeed/", "torch/") if f"/{k}" in name), None)
    if pkg:                          # a library, wherever installed: from its package folder
        name = name[name.rindex(f"/{pkg}") + 1:]
    elif os.path.isabs(name):        # this repository's files relative to it, anything else by its name
        rel = os.path.relpath(name)
        name = os.path.basename(name) if rel.startswith("..") else rel
    return f"{name}:{f.get('line')} {f.get('name')}"


def site(frames: list[dict] | None) -> str:
    """The innermost frame from this repository or from the libraries in LIBS, else the innermost."""
    frames = frames or []
    for f in frames:
        if any(k in f.get("filename", "") for k in OWN + LIBS):
            return short(f)
    return short(frames[0]) if frames else "(allocated before the recorded window)"


def live_at_peak(snapshot: dict, device: int = 0) -> tuple[int, dict[int, tuple[int, str]], list[str]]:
    """(peak allocated bytes, {address: (bytes, site)} live at that moment, the named frames of the
    allocation that reached it), replaying the recorded events backwards from the blocks the snapshot
    holds at its end (event i undone takes the state to before it)."""
    live: dict[int, tuple[int, str]] = {}
    for seg in snapshot["segments"]:
        if seg.get("device", device) != device:
            continue
        for blk in seg["blocks"]:
            if blk["state"] == "active_allocated":
                live[blk["address"]] = (blk["size"], site(blk.get("frames")))
    events = snapshot["device_traces"][device]
    total = sum(s for s, _ in live.values())
    best, best_i = total, len(events)       # index: the state after events[:best_i]
    for i in range(len(events) - 1, -1, -1):
        e = events[i]
        if e["action"] == "alloc":
            total -= e["size"]
        elif e["action"] == "free_completed":
            total += e["size"]
        if total > best:
            best, best_i = total, i
    peak_frames = events[best_i]["frames"] if best_i < len(events) else []
    for e in reversed(events[best_i:]):      # undo the events after the peak
        if e["action"] == "alloc":
            live.pop(e["addr"], None)
        elif e["action"] == "free_completed":
            live[e["addr"]] = (e["size"], site(e.get("frames")))
    return best, live, [short(f) for f in (peak_frames or [])
                         if any(k in f.get("filename", "") for k in OWN + LIBS)]


def grouped(live: dict[int, tuple[int, str]]) -> list[tuple[str, int, int]]:
    """(site, bytes, blocks) largest first."""
    by: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, where in live.values():
        by[where][0] += size
        by[where][1] += 1
    return sorted(((k, v[0], v[1]) for k, v in by.items()), key=lambda x: -x[1])


def predicted(model: str, plan_path: str, profile: str | None) -> dict | None:
    """The cost model's per-part peak for the plan (stage 0), as validate.py prints it."""
    from autotune.calibrate import predict_run
    from autotune.cost_model import Calibration
    from autotune.hardware import load_hardware
    from autotune.model_profile import ModelProfile
    from autotune.plan import Plan
    from model_zoo import get_model_spec

    if not profile:
        return None
    plan = Plan.load(plan_path)
    prof = ModelProfile.load(profile)
    spec = get_model_spec(model, precision=plan.precision)
    _, mem = predict_run(plan, spec, load_hardware("1xH100"), prof, Calibration.from_dict(prof.calibration))
    return mem[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--galvatron-plan", required=True)
    ap.add_argument("--model-profile", default=None, help="profile for the predicted breakdown next to it")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-entries", type=int, default=2_000_000, help="allocator events kept (the last ones)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: the allocator trace needs a CUDA device; run this on a GPU", file=sys.stderr)
        return 2
    if not os.path.isfile(args.galvatron_plan):
        print(f"error: --galvatron-plan {args.galvatron_plan} does not exist", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29535")
    import train

    os.makedirs(args.out, exist_ok=True)
    metrics = os.path.join(tempfile.mkdtemp(), "m.jsonl")
    torch.cuda.memory._record_memory_history(max_entries=args.max_entries, stacks="python")
    rc = train.main(["--model", args.model, "--galvatron-plan", args.galvatron_plan, "--steps", str(args.steps),
                     "--metrics-file", metrics, "--force"])
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, live, where = live_at_peak(snap, torch.cuda.current_device())
    groups = grouped(live)
    from autotune.validate import read_summary

    try:
        measured = read_summary(metrics)
    except (OSError, RuntimeError):        # train.py did not finish: the trace still shows what it held
        measured = None
    result = {"model": args.model, "plan": args.galvatron_plan, "rc": rc, "steps": args.steps,
              "trace_peak_mb": peak / MB, "max_memory_allocated_mb": torch.cuda.max_memory_allocated() / MB,
              "measured": measured,
              "predicted": predicted(args.model, args.galvatron_plan, args.model_profile),
              "peak_allocation_stack": where,
              "live_at_peak": [{"site": s, "mb": b / MB, "blocks": n} for s, b, n in groups]}
    with open(os.path.join(args.out, "peak.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"peak from the trace {peak / MB:.0f} MB, max_memory_allocated {result['max_memory_allocated_mb']:.0f} MB"]
    if result["predicted"]:
        lines.append("predicted: " + ", ".join(f"{k} {v:.0f}" for k, v in result["predicted"].items()))
    lines.append("allocation that reached the peak: " + " <- ".join(where[:8]))
    lines += [f"{b / MB:10.1f} MB {n:6d} blocks  {s}" for s, b, n in groups[: args.top]]
    with open(os.path.join(args.out, "peak.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
