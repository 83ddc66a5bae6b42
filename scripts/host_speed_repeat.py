"""Does the host's launch speed explain why the same train.py configuration runs at different speeds?

    python scripts/host_speed_repeat.py --model swin-base --bsz 32 --zero 0 --repeats 6 --out runs/repeat.jsonl

One-GPU steps of these models are partly bound by the CPU launching kernels, and the same configuration
in fresh processes has measured 111-139 ms on one host (session 5). This runs the configuration
`--repeats` times, each in a fresh process that first times two host probes and then trains through
train.py's own code path in the same process (scripts/sweep_single_gpu.run_one):
  launch_us  CPU time per launch of a tiny kernel while the GPU spins (nothing waits for the GPU);
  python_us  one pass of a fixed pure-Python loop (interpreter speed, no GPU), per 1000 iterations.
It appends one JSON line per process (the sweep record plus "host_probe") and prints the correlation
of the step time with each probe over the processes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE_REPS = 7


def launch_us(launches: int = 256) -> float:
    """Median over PROBE_REPS of the host's time per launch of a one-element add behind a GPU spin.

    Far fewer launches than CUDA's queue of pending work holds (about a thousand): with 2000 (before
    session 11) the queue filled and the host waited out the spin, so every process read the spin's
    length / 2000 (55.4-55.9 us in profiles/h100/runs/s7/host_speed.jsonl), not its launch speed. A
    repetition whose spin ended before the launches did is refused."""
    import torch

    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    out = []
    for _ in range(PROBE_REPS):
        torch.cuda._sleep(200_000_000)          # ~0.1 s of spin: the launches below never wait
        spun = torch.cuda.Event()
        spun.record()
        t0 = time.perf_counter()
        for _ in range(launches):
            x.add_(1.0)
        elapsed = time.perf_counter() - t0
        if spun.query():
            raise RuntimeError("the GPU finished its spin before the launches did: the probe waited on it")
        out.append(elapsed / launches * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def python_us(iters: int = 200_000) -> float:
    """Median over PROBE_REPS of a fixed pure-Python loop, per 1000 iterations."""
    out = []
    for _ in range(PROBE_REPS):
        t0 = time.perf_counter()
        acc = 0
        for i in range(iters):
            acc += i & 7
        out.append((time.perf_counter() - t0) / iters * 1e9)
    return statistics.median(out)


def child(args: argparse.Namespace) -> int:
    from model_zoo import get_model_spec
    from scripts.sweep_single_gpu import run_one

    probe = {"launch_us": launch_us(), "python_us_per_1000": python_us()}
    cfg = {"bsz": args.bsz, "chunks": args.chunks, "ckpt": args.ckpt, "zero": args.zero, "precision": args.precision}
    rec = run_one(args.model, cfg, args.steps, get_model_spec(args.model).num_layers)
    rec["host_probe"] = probe
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"[host-speed] {args.model} {cfg}: step {(rec.get('measured') or {}).get('step_time_s')} s, "
          f"launch {probe['launch_us']:.2f} us, python {probe['python_us_per_1000']:.1f} us/1000", flush=True)
    return 0 if "measured" in rec else 1


def correlation(xs: list[float], ys: list[float]) -> float:
    """Pearson's r; nan when either side is constant."""
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:
        return float("nan")


def summary(path: str, model: str) -> None:
    with open(path) as f:
        recs = [json.loads(x) for x in f if x.strip()]
    recs = [r for r in recs if r.get("model") == model and "measured" in r and "host_probe" in r]
    if len(recs) < 3:
        print("[host-speed] fewer than 3 finished processes: no correlation")
        return
    step = [r["measured"]["step_time_s"] for r in recs]
    print(f"[host-speed] {len(recs)} processes: step {min(step) * 1e3:.1f}-{max(step) * 1e3:.1f} ms "
          f"(median {statistics.median(step) * 1e3:.1f})")
    for key in ("launch_us", "python_us_per_1000"):
        vals = [r["host_probe"][key] for r in recs]
        print(f"[host-speed] {key}: {min(vals):.2f}-{max(vals):.2f}, correlation with step time "
              f"{correlation(vals, step):+.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="swin-base")
    ap.add_argument("--bsz", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--ckpt", type=int, default=0)
    ap.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    if args.child:
        return child(args)
    import torch

    if not torch.cuda.is_available():
        print("error: the launch probe needs a CUDA device; run this on a GPU", file=sys.stderr)
        return 2
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *sys.argv[1:]]
    for i in range(args.repeats):
        if subprocess.run(cmd).returncode:
            print(f"[host-speed] process {i + 1}/{args.repeats} failed", flush=True)
    summary(args.out, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
