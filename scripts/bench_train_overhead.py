"""train.py (dp=1 plan) against a plain Hugging Face training loop on the same model and batch.

    python scripts/bench_train_overhead.py [--model bert-test] [--batch 8] [--steps 30] [--device cpu|cuda]

The plain loop is what a user writes without us: HF model, torch AdamW, clip 1.0, the same
synthetic batches. train.py runs the same model through the plan translation (Megatron groups,
DeepSpeed engine). Both report the median step time after warm-up; the ratio is the overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))    # scripts/bench_engine_modes.py


def plain_hf(model_name: str, batch: int, steps: int, precision: str) -> list[float]:
    """Step times of the plain HF loop (scripts/bench_engine_modes.py's HFRunner: torch AdamW, clip 1.0,
    bf16 autocast only for bf16)."""
    import torch

    from bench_engine_modes import HFRunner, setup_model, timed_steps

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runner = HFRunner(*setup_model(model_name), batch, compile_layers=False, autocast=precision == "bf16")
    return timed_steps(runner, steps)


def ours(model_name: str, batch: int, steps: int, precision: str) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        zero = "1" if precision == "bf16" else "0"   # what the search emits for one GPU
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", model_name, "--steps", str(steps),
                        "--global-batch-size", str(batch), "--zero-stage", zero, "--precision", precision,
                        "--metrics-file", metrics], check=True, capture_output=True, cwd=ROOT)
        with open(metrics) as f:
            return [json.loads(x)["step_time_s"] for x in f if x.strip() and "step_time_s" in json.loads(x)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bert-test")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    precision = "bf16" if a.device == "cuda" else "fp32"
    warm = max(2, a.steps // 5)
    hf = statistics.median(plain_hf(a.model, a.batch, a.steps, precision)[warm:])
    us = statistics.median(ours(a.model, a.batch, a.steps, precision)[warm:])
    print(f"{a.model} batch {a.batch} on {a.device} ({precision}), median of {a.steps - warm} steps:")
    print(f"  plain HF loop   {hf * 1e3:8.2f} ms/step")
    print(f"  train.py (dp=1) {us * 1e3:8.2f} ms/step   ratio {us / hf:.3f} ({(us / hf - 1):+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
