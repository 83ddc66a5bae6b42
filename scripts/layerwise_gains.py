"""Predicted gain of layer-wise plans over the best uniform plan at tight memory budgets.

    python scripts/layerwise_gains.py --out docs/layerwise_gains.md

For swin-huge, t5-3b and bert-huge-32 on 8 and 16 GPUs (8xH100 preset, 2 nodes for 16) at several
per-GPU budgets and a fixed global batch, runs the search in the `layerwise` space and reports the
best layer-wise plan next to the best uniform one (both predictions of the same cost model).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotune.cost_model import Setting  # noqa: E402
from autotune.plan import count_runs  # noqa: E402
from autotune.search import parse_args, run_search  # noqa: E402

MODELS = ("swin-huge", "t5-3b", "bert-huge-32")
BUDGETS = (8, 12, 16, 24)


def describe(ev, world: int) -> str:
    """Galvatron-style runs of per-layer strategies, e.g. `4-1-2 x30, 4-2*-1 x4`."""
    c = ev.cand
    setting = Setting(world, c.pp, c.zero, c.chunks, c.global_bsz)
    return count_runs([st.label(setting) for st in ev.strategies]) + f" (vtp {c.vtp}, chunks {c.chunks})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--global-batch-size", type=int, default=256)
    a = ap.parse_args()
    lines = ["# Layer-wise TP: predicted gains over the best uniform plan", "",
             f"Command: `python scripts/layerwise_gains.py --out {a.out}` (global batch {a.global_batch_size}, "
             "8xH100 preset; 16 GPUs = 2 nodes). Predictions only: measuring them needs the multi-GPU machine.", "",
             "The layer-wise space contains the uniform plans; its mixed-TP candidates are restricted to ZeRO <= 2 "
             "(what the per-layer runtime is to support), so a uniform ZeRO-3 plan can still win. `gain` is the "
             "best mixed-TP plan over the best uniform one.", "",
             "| model | GPUs | GB | best uniform samples/s | best mixed-TP samples/s | gain | best mixed-TP plan |",
             "|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for gpus in (8, 16):
            for mem in BUDGETS:
                args = parse_args(["--model", model, "--gpus", str(gpus), "--gpu-memory-gb", str(mem),
                                   "--global-batch-size", str(a.global_batch_size), "--space", "layerwise",
                                   "--quiet", "--out", os.path.join(os.environ.get("TMPDIR", "/tmp"), "lw.json")])
                try:
                    plan, _, results = run_search(args)
                except ValueError:
                    lines.append(f"| {model} | {gpus} | {mem} | no plan fits | | | |")
                    continue
                uni = [r for r in results if not r.cand.layerwise]
                lw = [r for r in results if r.cand.layerwise]
                u = max(uni, key=lambda r: r.samples_per_s) if uni else None
                w = max(lw, key=lambda r: r.samples_per_s) if lw else None
                us = f"{u.samples_per_s:.1f}" if u else "none fits"
                if w is None:
                    lines.append(f"| {model} | {gpus} | {mem} | {us} | none | | |")
                    continue
                gain = f"{w.samples_per_s / u.samples_per_s:.2f}x" if u else "only layer-wise fits"
                lines.append(f"| {model} | {gpus} | {mem} | {us} | {w.samples_per_s:.1f} | {gain} | "
                             f"{describe(w, gpus)} |")
                print(lines[-1], flush=True)
    with open(a.out + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
