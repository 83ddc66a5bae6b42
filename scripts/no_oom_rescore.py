"""Re-predict the peak memory of earlier no-OOM check runs with the current cost model and profiles.

    python scripts/no_oom_rescore.py profiles/h100/runs/s3/no_oom_pass2.jsonl profiles/h100/runs/s3/no_oom_pass3_calibrated.jsonl

scripts/no_oom_check.py stores each plan with its measured peak (or "oom"). After a change of the memory
model or of a profile, this scores the same plans again, without a GPU: the prediction of the model
alone and with the calibration stored in the model's profile, against what was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    from autotune.calibrate import predict_run
    from autotune.cost_model import Calibration
    from autotune.hardware import load_hardware
    from autotune.model_profile import ModelProfile
    from autotune.plan import Plan
    from model_zoo import get_model_spec

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="JSON lines written by scripts/no_oom_check.py")
    ap.add_argument("--profiles", default=os.path.join(ROOT, "profiles", "h100"))
    ap.add_argument("--hardware", default="1xH100")
    args = ap.parse_args()
    hw = load_hardware(args.hardware)
    profiles: dict[str, ModelProfile] = {}      # loaded once per model, for every run of it
    print("| run | model | budget GB | plan | measured MB | model alone | with stored calibration |")
    print("|---|---|---|---|---|---|---|")
    for path in args.runs:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        for r in records:
            plan, model = Plan.from_dict(r["plan"]), r["model"]
            if model not in profiles:
                profiles[model] = ModelProfile.load(os.path.join(args.profiles, f"{model}.json"))
            profile = profiles[model]
            spec = get_model_spec(model, precision=plan.precision)
            measured = (r.get("measured") or {}).get("stage_peak_memory_mb", [None])[0]
            cells = []
            for cal in (Calibration(), None):      # None: the profile's stored calibration
                _, mem = predict_run(plan, spec, hw, profile, cal or Calibration.from_dict(profile.calibration))
                pred = mem[0]["total_mb"]
                cells.append(f"{pred:.0f}" + (f" ({(pred - measured) / measured:+.1%})" if measured else ""))
            shown = f"{measured:.0f}" if measured else "out of memory"
            print(f"| {os.path.basename(path)} | {model} | {r['budget_gb']:g} | {plan.describe()} | {shown} | "
                  f"{cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
