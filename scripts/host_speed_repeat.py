"""Does the host's launch speed explain why the same train.py configuration runs at different speeds?

    python scripts/host_speed_repeat.py --model swin-base --bsz 32 --zero 0 --repeats 6 --out runs/repeat.jsonl

One-GPU steps of these models are partly bound by the CPU launching kernels, and the same configuration
in fresh processes has measured 111-139 ms on one host (session 5). This runs the configuration
`--repeats` times, each in a fresh process that times two host probes before and after it trains
through train.py's own code path in the same process (scripts/sweep_single_gpu.run_one):
  launch_us  CPU time per launch of a tiny kernel while the GPU spins (nothing waits for the GPU);
  python_us  one pass of a fixed pure-Python loop (interpreter speed, no GPU), per 1000 iterations;
and, over the training, how many CPUs' worth of work the machine's other processes and the hypervisor
(steal) took (/proc/stat). It appends one JSON line per process (the sweep record plus "host_probe" and
"machine_load"; train.py's step records carry host_s / host_cpu_s, the time until the host had queued
the step and the process's CPU time meanwhile) and prints, per process, the step time beside them and the
correlation of the step time with each probe.
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
PROBE_ITERS = 20_000          # the sampler's speed probe: a few ms


def launch_us(launches: int = 256) -> dict[str, float]:
    """Median over PROBE_REPS of the host's time per launch of a one-element add behind a GPU spin, and
    how many repetitions the spin did not cover.

    Far fewer launches than CUDA's queue of pending work holds (about a thousand): with 2000 (before
    session 11) the queue filled and the host waited out the spin, so every process read the spin's
    length / 2000 (55.4-55.9 us in profiles/h100/runs/s7/host_speed.jsonl), not its launch speed. The
    kernels are loaded before the first repetition (a first launch loads them: session 12's first try
    outran a 0.1 s spin and refused the process), and the spin is now 5x longer."""
    import torch

    x = torch.zeros(1, device="cuda")
    x.add_(1.0)
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    kept, outran = [], []
    for _ in range(PROBE_REPS):
        torch.cuda._sleep(1_000_000_000)        # ~0.5 s of spin: the launches below never wait
        spun = torch.cuda.Event()
        spun.record()
        t0 = time.perf_counter()
        for _ in range(launches):
            x.add_(1.0)
        elapsed = time.perf_counter() - t0
        (outran if spun.query() else kept).append(elapsed / launches * 1e6)
        torch.cuda.synchronize()
    # 256 one-element adds never fill the queue by themselves, so a repetition the spin did not cover
    # still reads the launch speed unless the GPU was slower than the host: kept, but counted
    return {"launch_us": statistics.median(kept or outran), "launch_reps_uncovered": len(outran)}


def python_loop_us(iters: int) -> float:
    """One pass of a fixed pure-Python loop (interpreter speed, no GPU), us per 1000 iterations."""
    t0 = time.perf_counter()
    acc = 0
    for i in range(iters):
        acc += i & 7
    return (time.perf_counter() - t0) / iters * 1e9


def python_us(iters: int = 200_000) -> float:
    """Median over PROBE_REPS of python_loop_us."""
    return statistics.median(python_loop_us(iters) for _ in range(PROBE_REPS))


def machine_cpu_s() -> dict[str, float]:
    """Seconds of CPU time since boot, all CPUs together (/proc/stat): busy, idle and steal (the hypervisor's)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return {"busy": (user + nice + system + irq + softirq) / tick, "idle": (idle + iowait) / tick,
            "steal": steal / tick}


def cpu_times() -> dict[str, float]:
    """machine_cpu_s and this process's own CPU time (getrusage): what the other processes on the machine and
    the hypervisor (steal) took while a run trained."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    return {**machine_cpu_s(), "own": own.ru_utime + own.ru_stime, "wall": time.time(),
            "involuntary_switches": own.ru_nivcsw}


def load_during(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPUs' worth of work by everything else, of steal, and this process's involuntary context switches."""
    wall = after["wall"] - before["wall"]
    d = {k: after[k] - before[k] for k in before}
    return {"others_cpus": (d["busy"] - d["own"]) / wall, "steal_cpus": d["steal"] / wall,
            "own_cpus": d["own"] / wall, "involuntary_switches": d["involuntary_switches"]}


def sample_machine(path: str, period_s: float = 0.25) -> int:
    """Until killed: one JSON line per period with the machine's CPU use over it (all CPUs' busy, steal, in
    CPUs' worth), the CPUs' reported clock (/proc/cpuinfo), the speed of a short pure-Python loop run in this
    process on another CPU than the training (a KVM guest sees neither its neighbours' load nor the turbo
    clock it gets: this is the speed it gets) and the wall time, to line up with train.py's step records
    ("time") afterwards."""
    def mhz() -> list[float]:
        with open("/proc/cpuinfo") as f:
            return [float(x.split(":")[1]) for x in f if x.startswith("cpu MHz")]

    prev, t_prev = machine_cpu_s(), time.time()
    with open(path, "a") as out:
        while True:
            time.sleep(period_s)
            cur, t = machine_cpu_s(), time.time()
            clocks = mhz()
            out.write(json.dumps({"t": t, "python_us_per_1000": python_loop_us(PROBE_ITERS),
                                  "busy_cpus": (cur["busy"] - prev["busy"]) / (t - t_prev),
                                  "steal_cpus": (cur["steal"] - prev["steal"]) / (t - t_prev),
                                  "mhz_min": min(clocks, default=None), "mhz_max": max(clocks, default=None)}) + "\n")
            out.flush()
            prev, t_prev = cur, t


def child(args: argparse.Namespace) -> int:
    from model_zoo import get_model_spec
    from scripts.sweep_single_gpu import run_one

    before = {**launch_us(), "python_us_per_1000": python_us()}
    cfg = {"bsz": args.bsz, "chunks": args.chunks, "ckpt": args.ckpt, "zero": args.zero, "precision": args.precision}
    t0 = cpu_times()
    rec = run_one(args.model, cfg, args.steps, get_model_spec(args.model).num_layers)
    rec["machine_load"] = load_during(t0, cpu_times())
    after = {**launch_us(), "python_us_per_1000": python_us()}
    # the mean of the probes before and after training brackets the host's speed during it
    probe = {k: (before[k] + after[k]) / 2 for k in ("launch_us", "python_us_per_1000")}
    rec["host_probe"] = {**probe, "before": before, "after": after}
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
    recs = []
    if os.path.exists(path):
        with open(path) as f:
            recs = [json.loads(x) for x in f if x.strip()]
    recs = [r for r in recs if r.get("model") == model and "measured" in r and "host_probe" in r]
    if len(recs) < 3:
        print(f"[host-speed] {len(recs)} finished processes: no correlation")
        return
    step = [r["measured"]["step_time_s"] for r in recs]
    print(f"[host-speed] {len(recs)} processes: step {min(step) * 1e3:.1f}-{max(step) * 1e3:.1f} ms "
          f"(median {statistics.median(step) * 1e3:.1f})")
    for r, t in zip(recs, step):
        host, cpu = (r["measured"].get(k, float("nan")) for k in ("host_s", "host_cpu_s"))   # train.py's medians
        load = r.get("machine_load", {})
        print(f"[host-speed]   step {t * 1e3:7.1f} ms | host queued it in {host * 1e3:7.1f} ms, process CPU "
              f"{cpu * 1e3:7.1f} ms | launch {r['host_probe']['launch_us']:.2f} us | python "
              f"{r['host_probe']['python_us_per_1000']:.1f} us/1000 | others {load.get('others_cpus', float('nan')):.2f} "
              f"CPUs, steal {load.get('steal_cpus', float('nan')):.2f}")
    for key in ("launch_us", "python_us_per_1000"):
        vals = [r["host_probe"][key] for r in recs]
        print(f"[host-speed] {key}: {min(vals):.2f}-{max(vals):.2f}, correlation with step time "
              f"{correlation(vals, step):+.2f}")
    others = [r.get("machine_load", {}).get("others_cpus", float("nan")) for r in recs]
    print(f"[host-speed] other processes' load: correlation with step time {correlation(others, step):+.2f}")


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
    ap.add_argument("--sample-machine", metavar="FILE",
                    help="only sample the machine's CPU use and clock into FILE every 0.25 s until killed")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.sample_machine:
        return sample_machine(args.sample_machine)
    if not args.out:
        ap.error("--out is required (or --sample-machine FILE)")
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
