"""train.py (dp=1 plan) against a plain Hugging Face training loop on the same model and batch.

    python scripts/bench_train_overhead.py [--model bert-test] [--batch 8] [--steps 30] [--device cpu|cuda] [--repeats 2]

The plain loop is what a user writes without us: HF model, torch AdamW, clip 1.0, the same
synthetic batches. train.py runs the same model through the plan translation (Megatron groups,
DeepSpeed engine). Each runs in its own fresh process, alternating (HF, train.py, HF, ...) `--repeats`
times, since fresh processes on one host differ by several percent; each reports the median step time
after warm-up, and the ratio of the medians over the repeats is the overhead.
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


def plain_hf_process(model_name: str, batch: int, steps: int, precision: str) -> list[float]:
    """plain_hf in a fresh process (as train.py runs in one)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--model", model_name, "--batch", str(batch),
                          "--steps", str(steps), "--precision", precision, "--hf-only"],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bert-test")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=2, help="alternating pairs of fresh processes (default 2)")
    ap.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)   # child: print HF step times
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    precision = a.precision or ("bf16" if a.device == "cuda" else "fp32")
    if a.hf_only:
        print(json.dumps(plain_hf(a.model, a.batch, a.steps, precision)))
        return 0
    warm = max(2, a.steps // 5)
    hf, us = [], []
    for _ in range(a.repeats):
        hf.append(statistics.median(plain_hf_process(a.model, a.batch, a.steps, precision)[warm:]))
        us.append(statistics.median(ours(a.model, a.batch, a.steps, precision)[warm:]))
    h, u = statistics.median(hf), statistics.median(us)
    print(f"{a.model} batch {a.batch} on {a.device} ({precision}), median of {a.steps - warm} steps per process, "
          f"{a.repeats} alternating pairs of processes:")
    print(f"  plain HF loop   {h * 1e3:8.2f} ms/step   (per process: {', '.join(f'{x * 1e3:.0f}' for x in hf)})")
    print(f"  train.py (dp=1) {u * 1e3:8.2f} ms/step   (per process: {', '.join(f'{x * 1e3:.0f}' for x in us)})"
          f"   ratio {u / h:.3f} ({(u / h - 1):+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
