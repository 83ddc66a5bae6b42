"""End-to-end demo on CPU: profile, search, train with the plan, and show measured next to predicted.

    python scripts/demo.py [--model bert-test] [--ranks 4] [--steps 6] [--out runs/demo]

1. profile the "cluster" (N gloo ranks on this machine) with autotune/profile_hardware.py --quick;
2. profile the model's layers on this CPU with autotune/profile_model.py;
3. search a plan for N ranks from those two files (fp32, as CPUs train);
4. train the model with that plan under torchrun for a few steps (train.py), and
5. print the plan's predictions beside the measurements (autotune/validate.py).
Every step writes its file under --out; nothing needs a GPU or a model hub.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step(title: str, cmd: list[str]) -> None:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"   ({time.time() - t0:.0f} s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bert-test")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--global-batch-size", type=int, default=16)
    ap.add_argument("--memory-gb", type=float, default=4.0, help="memory budget per rank for the search")
    ap.add_argument("--out", default=os.path.join("runs", "demo"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"]
    hw, prof, plan = (os.path.join(out, f) for f in ("hardware.json", "profile.json", "plan.json"))
    env_note = "OMP_NUM_THREADS=1 keeps the ranks from fighting over cores"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"Galvatron-DS demo: {args.model} on {args.ranks} CPU ranks ({env_note})")
    step("1/4 hardware profile (gloo)", torchrun + ["autotune/profile_hardware.py", "--device", "cpu", "--quick",
                                                   "--name", f"{args.ranks}xCPU", "--out", hw])
    step("2/4 model profile (CPU, fp32)", [py, "autotune/profile_model.py", "--model", args.model, "--device", "cpu",
                                           "--precision", "fp32", "--batch-sizes", "1,2,4", "--tp", "1,2,4",
                                           "--out", prof])
    step("3/4 search", [py, "autotune/search.py", "--model", args.model, "--gpus", str(args.ranks),
                        "--gpu-memory-gb", str(args.memory_gb), "--global-batch-size", str(args.global_batch_size),
                        "--precision", "fp32", "--hardware", hw, "--model-profile", prof, "--out", plan, "--quiet"])
    step("4/4 train with the plan, then measured vs predicted",
         [py, "autotune/validate.py", "--galvatron-plan", plan, "--model", args.model, "--steps", str(args.steps),
          "--hardware", hw, "--model-profile", prof, "--out", os.path.join(out, "validate")])
    print(f"\nFiles: {out}")
    print("Note: on CPU the measured peak memory is the process RSS (Python, torch and all), while the "
          "prediction counts what a GPU's caching allocator would hold; times are CPU times.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
