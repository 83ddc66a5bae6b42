"""Search-time benchmark on this machine: prints a table (full `layerwise` space by default, batch searched).

    python scripts/bench_search.py [--repeat 3] [--space uniform]

Targets (2-core CPU): 8 GPUs x bert-large <= 1 s; 64 GPUs x t5-3b <= 10 s; 1024 GPUs x t5-3b <= 60 s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotune.search import parse_args, run_search  # noqa: E402

CASES = [
    ("bert-large", 8, 1, 40, 1.0),
    ("t5-3b", 64, 8, 40, 10.0),
    ("t5-3b", 1024, 128, 40, 60.0),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out-dir", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--space", default="layerwise", help="search space (layerwise is the default of search.py)")
    a = ap.parse_args()
    rows = []
    for model, gpus, nodes, mem, target in CASES:
        times, plan = [], None
        for _ in range(a.repeat):
            args = parse_args(["--model", model, "--gpus", str(gpus), "--nodes", str(nodes), "--gpu-memory-gb",
                               str(mem), "--hardware", "8xH100", "--quiet", "--space", a.space,
                               "--out", os.path.join(a.out_dir, "bench_plan.json")])
            t0 = time.perf_counter()
            plan, _, _ = run_search(args)
            times.append(time.perf_counter() - t0)
        rows.append((model, gpus, mem, plan.search["configurations"], statistics.median(times), target,
                     plan.predicted["samples_per_s"], plan.describe()))
    print(f"{'model':<11} {'GPUs':>5} {'GB':>4} {'configs':>8} {'median s':>9} {'target s':>9} {'ok':>3}  "
          f"{'samples/s':>10}  plan")
    for model, gpus, mem, n, sec, target, sps, desc in rows:
        print(f"{model:<11} {gpus:>5} {mem:>4} {n:>8} {sec:>9.3f} {target:>9.1f} {'yes' if sec <= target else 'NO':>3}  "
              f"{sps:>10.1f}  {desc[:60]}")
    return 0 if all(r[4] <= r[5] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
