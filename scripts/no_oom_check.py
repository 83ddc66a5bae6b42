"""No-OOM check: the plan the search emits for one GPU at several memory budgets must train without
running out of memory on a device capped at that budget.

    python scripts/no_oom_check.py --models bert-large,vit-large,swin-base,t5-large --budgets 20,40,80 \
        --profiles profiles/h100 --out runs/no_oom.jsonl

For each (model, budget): `autotune/search.py --gpus 1 --gpu-memory-gb B` with the model's measured
profile, then train.py on that plan in a fresh process whose CUDA caching allocator is capped at B GB
(`torch.cuda.set_per_process_memory_fraction`), so a plan that needs more than B GB fails with an
out-of-memory error instead of borrowing the rest of the 80 GB card. One JSON line per pair: the plan,
predicted and measured peak, and "oom" true/false. Needs a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from autotune.validate import read_summary_record  # noqa: E402

# Run in the child: cap the allocator, then train.py's own main() on the plan.
CHILD = """
import sys, torch
budget_gb = float(sys.argv[1])
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * 2**30 / total))
import train
sys.exit(train.main(sys.argv[2:]))
"""


def profile_args(model: str, profiles: str) -> list[str]:
    """--model-profile for the model's measured profile where the folder has one (else analytic)."""
    path = os.path.join(profiles, f"{model}.json")
    return ["--model-profile", path] if os.path.exists(path) else []


def search(model: str, budget: float, profiles: str, hardware: str, out_dir: str) -> dict:
    plan_path = os.path.join(out_dir, "plan.json")
    cmd = [sys.executable, os.path.join(ROOT, "autotune", "search.py"), "--model", model, "--gpus", "1",
           "--hardware", hardware, "--gpu-memory-gb", str(budget), "--out", plan_path, "--quiet",
           *profile_args(model, profiles)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        return {"search_error": (r.stderr or r.stdout).strip().splitlines()[-1:]}
    with open(plan_path) as f:
        return {"plan_path": plan_path, "plan": json.load(f)}


def train(model: str, budget: float, plan_path: str, profiles: str, steps: int, out_dir: str) -> dict:
    metrics = os.path.join(out_dir, "metrics.jsonl")
    args = ["--model", model, "--galvatron-plan", plan_path, "--steps", str(steps), "--metrics-file", metrics,
            "--gpu-memory-gb", str(budget), *profile_args(model, profiles)]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29541")}
    r = subprocess.run([sys.executable, "-c", CHILD, str(budget), *args], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    log = (r.stdout + r.stderr)
    rec = {"rc": r.returncode, "oom": "out of memory" in log.lower()}
    if r.returncode == 0:
        summary = read_summary_record(metrics)
        rec["measured"], rec["predicted"] = summary["measured"], summary.get("predicted")
    if r.returncode:
        rec["log_tail"] = log.strip().splitlines()[-3:]
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bert-large,vit-large,swin-base,t5-large")
    ap.add_argument("--budgets", default="20,40,80", help="GB per GPU, comma-separated")
    ap.add_argument("--profiles", default=os.path.join(ROOT, "profiles", "h100"))
    ap.add_argument("--hardware", default="1xH100")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", required=True, help="JSON lines, one per (model, budget)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: the no-OOM check needs a GPU (it caps the CUDA allocator at each budget)", file=sys.stderr)
        return 2
    for model in args.models.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                rec = {"model": model, "budget_gb": budget, **search(model, budget, args.profiles, args.hardware, tmp)}
                if "plan_path" in rec:
                    rec.update(train(model, budget, rec.pop("plan_path"), args.profiles, args.steps, tmp))
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            m, p = rec.get("measured") or {}, rec.get("predicted") or {}
            print(f"[no-oom] {model} {budget:g} GB: rc={rec.get('rc')} oom={rec.get('oom')} "
                  f"peak measured {m.get('stage_peak_memory_mb')} MB, predicted {p.get('stage_peak_memory_mb')} MB, "
                  f"{m.get('samples_per_s')} samples/s {rec.get('search_error') or rec.get('log_tail') or ''}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
