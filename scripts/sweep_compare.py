"""Two sets of sweep runs of the same configurations side by side: is B's step time different from A's beyond
the spread between processes?

    python scripts/sweep_compare.py --a profiles/h200/runs/s14/ab/timer_on.jsonl \
        --b profiles/h200/runs/s14/ab/timer_off.jsonl --names "timer on,timer off"

For an A/B of two code versions on one machine (scripts/gpu_timer_ab.sh): each configuration's step time in every
run (one per process) of A and of B, the ratio of their medians, and whether the two ranges overlap. On the lent
machines the same launch-bound configuration moves by up to 1.5x between fresh processes, so one run of each is
no evidence; a change shows when B's range lies outside A's in most configurations.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sweep_report import load, steady  # noqa: E402


def step_times(paths: list[str]) -> dict[tuple[str, str], list[float]]:
    """{(model, configuration as JSON): step times of its successful runs, in file order}."""
    out: dict[tuple[str, str], list[float]] = {}
    for model, recs in load(paths).items():
        for r in map(steady, recs):
            if "measured" in r:
                key = (model, json.dumps(r["config"], sort_keys=True))
                out.setdefault(key, []).append(r["measured"]["step_time_s"])
    return out


def compare(a: dict[tuple[str, str], list[float]], b: dict[tuple[str, str], list[float]]) -> tuple[list[dict], dict]:
    """Rows for the configurations in both (A's order), and a summary: the geometric mean of the median ratios
    B/A, how many configurations B ran faster in, and how many have B's range wholly below or above A's."""
    rows = []
    for key, ta in a.items():
        tb = b.get(key)
        if not tb:
            continue
        ratio = statistics.median(tb) / statistics.median(ta)
        apart = "below" if max(tb) < min(ta) else "above" if min(tb) > max(ta) else ""
        rows.append({"model": key[0], "config": json.loads(key[1]), "a": ta, "b": tb, "ratio": ratio, "apart": apart})
    summary = {"configurations": len(rows),
               "geomean_ratio": math.exp(statistics.fmean(math.log(r["ratio"]) for r in rows)) if rows else None,
               "b_faster": sum(r["ratio"] < 1 for r in rows),
               "b_below": sum(r["apart"] == "below" for r in rows),
               "b_above": sum(r["apart"] == "above" for r in rows)}
    return rows, summary


def markdown(rows: list[dict], summary: dict, names: tuple[str, str]) -> str:
    a, b = names
    ms = lambda ts: " / ".join(f"{t * 1e3:.1f}" for t in ts)  # noqa: E731
    lines = [f"| model | bsz | chunks | ckpt | ZeRO | prec | {a}, ms per run | {b}, ms per run | {b} / {a} (medians) "
             f"| {b}'s range |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        lines.append(f"| {r['model']} | {c['bsz']} | {c['chunks']} | {c['ckpt']} | {c['zero']} | {c['precision']} "
                     f"| {ms(r['a'])} | {ms(r['b'])} | {r['ratio']:.3f} | {r['apart'] or 'overlaps'} |")
    if rows:
        lines.append(f"\n{summary['configurations']} configurations: {b} / {a} geometric mean "
                     f"{summary['geomean_ratio']:.3f}; {b} faster in {summary['b_faster']}; {b}'s range below "
                     f"{a}'s in {summary['b_below']}, above in {summary['b_above']}, overlapping in the rest.")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", nargs="+", required=True, help="sweep files (FILE or FILE:MODEL,...) of version A")
    ap.add_argument("--b", nargs="+", required=True, help="sweep files of version B")
    ap.add_argument("--names", default="A,B", help="what to call A and B in the table, comma-separated")
    args = ap.parse_args()
    names = tuple(args.names.split(","))
    if len(names) != 2:
        print(f"error: --names {args.names!r}: give two names, e.g. --names 'timer on,timer off'", file=sys.stderr)
        return 2
    try:
        a, b = step_times(args.a), step_times(args.b)
    except (OSError, json.JSONDecodeError, KeyError) as e:
        print(f"error: cannot read the sweep files: {e}", file=sys.stderr)
        return 2
    rows, summary = compare(a, b)
    if not rows:
        print("error: no configuration was measured in both A and B: check the files", file=sys.stderr)
        return 2
    print(markdown(rows, summary, names), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
