"""One line per model profile: the pooled time-fit error, its GPU part and CPU launch scatter
(autotune.model_profile.split_fit_errors), and, for profiles with single-call regions (the marginal
launch timing of commit b29eeb3, session 8), how much more the first call after a synchronisation costs
and the fit error had the CPU time been the per-call time of the N-call region, as the profiler stores it
since (refitted from the same measurements).

    python scripts/launch_timing_summary.py OUT_DIR/*.json
"""
from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotune.model_profile import ModelProfile, ProfileError, split_fit_errors  # noqa: E402
from autotune.profile_model import refit  # noqa: E402


def first_call_excess(p: ModelProfile) -> float | None:
    """Median over split points of (single-call CPU time / marginal CPU time - 1); None without them."""
    ratios = [s / c - 1 for lt in p.layer_types.values() for e in lt.tp.values()
              for k, v in (e.raw.get("cpu_single_ms") or {}).items()
              for s, c in zip(v, e.raw["cpu_ms"][k]) if s and c]
    return statistics.median(ratios) if ratios else None


def as_region(p: ModelProfile) -> ModelProfile:
    """p with each split point's CPU time replaced by the per-call time of its N-call region,
    ((N - 1) * marginal + single) / N, time = max(cpu, gpu), and refitted."""
    for lt in p.layer_types.values():
        for e in lt.tp.values():
            raw = e.raw
            for k, single in (raw.get("cpu_single_ms") or {}).items():
                cpu = [((n - 1) * c + s) / n if c and s else c
                       for c, s, n in zip(raw["cpu_ms"][k], single, raw["calls_per_timing"])]
                raw["cpu_ms"][k] = cpu
                raw["time_ms"][k] = [max(c, g) if c and g else t for c, g, t in zip(cpu, raw["gpu_ms"][k],
                                                                                    raw["time_ms"][k])]
    return refit(p)


def line(path: str) -> str:
    p = ModelProfile.load(path)
    gpu, cpu = split_fit_errors(p)
    first = first_call_excess(p)
    fmt = lambda x: "-" if x is None else f"{x:.2%}"  # noqa: E731
    text = f"{os.path.basename(path)}: fit {p.fit_error:.2%} | GPU part {fmt(gpu)} | CPU scatter {fmt(cpu)}"
    if first is None:
        return text
    region = as_region(ModelProfile.load(path))
    return (text + f" | single call {first:+.1%} over the marginal | as the region's per-call time: fit "
            f"{region.fit_error:.2%}, CPU scatter {fmt(split_fit_errors(region)[1])}")


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python scripts/launch_timing_summary.py PROFILE.json [...]", file=sys.stderr)
        return 2
    for path in argv:
        try:
            print(line(path))
        except (ProfileError, OSError) as e:
            print(f"{os.path.basename(path)}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
