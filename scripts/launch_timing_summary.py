"""One line per model profile: the pooled time-fit error, its GPU part and CPU launch scatter
(autotune.model_profile.split_fit_errors), and, for profiles with single-call regions (the marginal
launch timing of session 8), how much more the first call after a synchronisation costs.

    python scripts/launch_timing_summary.py OUT_DIR/*.json
"""
from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotune.model_profile import ModelProfile, ProfileError, split_fit_errors  # noqa: E402


def first_call_excess(p: ModelProfile) -> float | None:
    """Median over split points of (single-call CPU time / marginal CPU time - 1); None without them."""
    ratios = [s / c - 1 for lt in p.layer_types.values() for e in lt.tp.values()
              for k, v in (e.raw.get("cpu_single_ms") or {}).items()
              for s, c in zip(v, e.raw["cpu_ms"][k]) if s and c]
    return statistics.median(ratios) if ratios else None


def line(path: str) -> str:
    p = ModelProfile.load(path)
    gpu, cpu = split_fit_errors(p)
    first = first_call_excess(p)
    fmt = lambda x: "-" if x is None else f"{x:.2%}"  # noqa: E731
    return (f"{os.path.basename(path)}: fit {p.fit_error:.2%} | GPU part {fmt(gpu)} | CPU scatter {fmt(cpu)}"
            + (f" | single call {first:+.1%} over the marginal" if first is not None else ""))


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
