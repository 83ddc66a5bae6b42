"""Fit the cost model's correction factors from a few short real runs and store them in the profile.

    python autotune/calibrate.py --model bert-large --model-profile profiles/h100/bert-large.json \
        --hardware 1xH100 --run plan1.json:metrics1.jsonl --run plan2.json:metrics2.jsonl [--check p3:m3 ...]

Each `--run` is a plan and the metrics file train.py wrote for it. The fit (least squares of relative
errors) gives: compute_scale (the profile's GPU lines) and host_scale (its launch floors and the engine's
host work), each fitted only when some run's step responds to it (--split-host bound, the default; `both` fits
both always, `none` one factor for both) and step_overhead_s from step times (comm_scale too when
the runs communicate), with `bound` the GPU lines' change with the micro-batch (compute_batch_exp, where the runs
that see the GPU span two micro-batch sizes) and the graphed layers' replay host time (replay_host_scale, from the
host clocks of graphed runs whose host never waited), activation_scale and memory_offset_mb from per-stage peak
memory; the offset is then
raised so that no calibration run is under-predicted. `--check` runs are scored, not fitted. The
factors go into the profile's "calibration" block, which CostModel applies on every later search.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from dataclasses import asdict

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotune.cost_model import Calibration  # noqa: E402
from autotune.plan import Plan  # noqa: E402


def evaluate_run(plan: Plan, spec, hw, profile, cal: Calibration):
    """The search's evaluation of `plan` (time, memory and costs per stage) under calibration `cal`."""
    from autotune.search import Searcher

    return Searcher(spec, hw, hw.gpu_memory_gb, profile=profile, calibration=cal).predict(plan)


def predict_run(plan: Plan, spec, hw, profile, cal: Calibration) -> tuple[float, list[dict]]:
    ev = evaluate_run(plan, spec, hw, profile, cal)
    return ev.step_time_s, ev.stage_memory


def run_bound(plan: Plan, spec, hw, profile) -> str:
    """'host' when the uncalibrated model's launch sum of the first stage's micro-batch exceeds its GPU sum
    (kernel launches set the pace), 'GPU' when not, '?' without both sums (no profile of that kind)."""
    return evaluate_run(plan, spec, hw, profile, Calibration()).stage_costs[0].bound


SEEN_SHARE = 0.25     # a run sees a time factor when its predicted step moves by >= this share of the factor's change


def host_field(plans: list[Plan]) -> str:
    """The Calibration field a fitted host factor goes to: graphed_host_scale when every run was graphed (their
    host-bound steps time the replays), else host_scale."""
    return "graphed_host_scale" if plans and all(p.cuda_graphs for p in plans) else "host_scale"


def host_factors(field: str, h: float | None) -> dict:
    """Calibration fields for a host factor h fitted into `field` (host_field); a graphed one leaves the eager host at
    1 (host_scale None would follow compute_scale)."""
    if h is None:
        return {}
    return {field: h, "host_scale": 1.0} if field == "graphed_host_scale" else {field: h}


def factors_seen(plan: Plan, spec, hw, profile) -> str:
    """Which time factors a run's step responds to: 'host', 'GPU', 'both', or '?' (no host/GPU split).

    By sensitivity, not by which sum is larger in forward and backward (run_bound): the optimizer step's host
    work (DeepSpeed's ZeRO-0 bf16 step: ~45 ms of loops on one H200 for every model) and the ZeRO-2 hooks are
    host time even when the layers' GPU time sets forward and backward, as it does under --cuda-graphs, where
    a ZeRO-0 step at a quarter of the anchor batch is two thirds that host work. Counted as GPU-bound, such
    a run fitted the GPU lines to the host's speed (session 20's graphed one-GPU sweeps)."""
    ev = evaluate_run(plan, spec, hw, profile, Calibration())
    if ev.stage_costs[0].bound == "?":
        return "?"
    t0 = ev.step_time_s
    host = predict_run(plan, spec, hw, profile, Calibration(**host_factors(host_field([plan]), 1.1)))[0] - t0
    gpu = predict_run(plan, spec, hw, profile, Calibration(compute_scale=1.1, host_scale=1.0))[0] - t0
    seen = [name for name, d in (("host", host), ("GPU", gpu)) if d >= SEEN_SHARE * 0.1 * t0]
    return "both" if len(seen) == 2 else (seen[0] if seen else "GPU")


SPLIT_MODES = {"none": False, "both": True, "bound": "bound"}    # --split-host's values -> fit_time's split_host
SCALE_LO, SCALE_HI = 0.4, 3.4     # range of the time factors searched
PRIOR = 1e-4                      # weight of (log factor)^2: a factor the runs do not pin stays near 1


def _grid(lo: float, hi: float, step: float) -> list[float]:
    return [round(lo + step * i, 4) for i in range(int(round((hi - lo) / step)) + 1)]


def fit_time(runs, predict, split_host: bool | str = False,
             field: str = "host_scale", fixed: dict | None = None) -> tuple[float, float | None, float, float]:
    """(compute_scale, host_scale, comm_scale, step_overhead_s) minimising squared relative step-time error.

    compute_scale scales the profile's GPU lines, host_scale its launch floors and the engine's host work:
    a training process may launch kernels slower or faster than the profiling one did (one-GPU sweep on an
    H200: the same plan's launch-bound steps differ by ~20 % from the profile's floors while its GPU-bound
    ones agree). Coarse grid over both (step 0.05), then a fine one (0.01) around the best; a weak prior
    keeps a factor the runs cannot see (all runs GPU-bound, or no profile) at 1. comm_scale is searched on
    its own when the runs communicate, then the pair refined again.

    host_scale is fitted only when asked (`split_host`; else None: the host follows compute_scale). On
    the one-GPU sweeps, calibration runs alike in kind (chunks 1, batch b, b/2, b/4) did not pin two
    factors: split, T5-large on the H100 scored 16.2 % instead of 8.4 % from three runs, and from four
    (the step offset fitted too) T5-large on the H200 68 % (docs/single_gpu_sweep_h200.md). Split only
    with runs that span launch-bound and GPU-bound steps.

    split_host="bound" fits only the factors the runs can see, by the model's own sensitivity of each run
    (run["bound"], factors_seen: 'host', 'GPU' or 'both'): both when some run sees each, else the one
    side's factor with the other kept at 1. One H200's GPU-bound steps repeat within 2 % while its
    launch-bound ones move 20-60 % between processes (a KVM guest's vCPUs run at the speed its
    neighbours leave), so one factor fitted to launch-bound runs moved the GPU lines of every GPU-bound
    step with them (BERT-large: 4.7 % median uncalibrated, 18.7 % after; docs/single_gpu_sweep_h200.md).

    step_overhead_s is fitted only from 4 runs on: with 3 or fewer (the usual few short runs, often
    alike) scale and offset trade off against each other and extrapolate badly (seen on the one-GPU
    sweep: ViT-L and Swin-B calibrated on three chunks=1 runs predicted chunks=2..4 at +60-200 %).

    `fixed`: other Calibration fields held through the fit (fit_batch_exp's)."""
    fixed = fixed or {}
    measured = [r["measured"]["step_time_s"] for r in runs]
    w = [1 / m ** 2 for m in measured]

    def score(a: float, h: float, b: float) -> tuple[float, float]:
        preds = [predict(r, Calibration(compute_scale=a, comm_scale=b, **host_factors(field, h), **fixed))[0]
                 for r in runs]
        d = sum(wi * (m - p) for wi, m, p in zip(w, measured, preds)) / sum(w) if len(runs) >= 4 else 0.0
        err = sum(((p + d - m) / m) ** 2 for p, m in zip(preds, measured))
        return err + PRIOR * (math.log(a) ** 2 + math.log(h) ** 2), d

    def best_pair(b: float, a_grid, h_grid) -> tuple[float, float, float, float]:
        return min(((*score(a, h, b), a, h) for a in a_grid for h in h_grid), key=lambda x: x[0])

    bounds = {r.get("bound") for r in runs} if split_host == "bound" else set()
    fine = _grid(SCALE_LO, SCALE_HI, 0.01)

    def refine(b: float) -> tuple[float, float, float, float]:
        if not split_host or (bounds and bounds <= {"?"}):   # one factor for both (and a profile without
            return min(((*score(a, a, b), a, a) for a in fine), key=lambda x: x[0])   # host/GPU sums)
        if bounds and bounds <= {"host"}:     # launch-bound runs only: they see the host, not the GPU
            return best_pair(b, [1.0], fine)
        if bounds and bounds <= {"GPU"}:      # ("both": factors_seen's runs that respond to both)
            return best_pair(b, fine, [1.0])
        _, _, a, h = best_pair(b, _grid(SCALE_LO, SCALE_HI, 0.05), _grid(SCALE_LO, SCALE_HI, 0.05))
        near = lambda x: [v for v in _grid(x - 0.05, x + 0.05, 0.01) if SCALE_LO <= v <= SCALE_HI]  # noqa: E731
        return best_pair(b, near(a), near(h))

    b = 1.0
    err, d, a, h = refine(b)
    if any(r["has_comm"] for r in runs):
        b = min(_grid(0.5, 3.0, 0.05), key=lambda x: score(a, h, x)[0])
        err, d, a, h = refine(b)
    return a, (h if split_host else None), b, d


BATCH_EXP_MAX = 0.15     # |compute_batch_exp| fitted at most: +-11 % a doubling of the micro-batch
# and at least: two runs 1.5 % apart by noise alone (the sweeps' repeat noise on one machine) at micro-batches
# two doublings apart read as a slope of ~0.015, so a fitted one under twice that is left at 0
BATCH_EXP_MIN = 0.03


def residual_batch_slope(runs, predict, cal: Calibration) -> tuple[float, float] | None:
    """(slope of log(measured / predicted) against log(micro-batch), their geometric-mean micro-batch) over
    the runs that see the GPU ('GPU' or 'both' bound) in one micro-batch (a step of several adds per-micro-batch
    engine work that is not the micro-batch's GPU efficiency: Swin-B's batch-64-in-4 run read as -3.4 % a
    doubling); None with fewer than two micro-batch sizes among them."""
    pts = [(math.log(r["plan"].micro_batch_size), math.log(r["measured"]["step_time_s"] / predict(r, cal)[0]))
           for r in runs if r.get("bound") in ("GPU", "both") and r["plan"].chunks == 1]
    if len({round(x, 6) for x, _ in pts}) < 2:
        return None
    mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts), math.exp(mx)


BATCH_EXP_ROUNDS = 4     # fits of compute_batch_exp: a run partly host-bound sees only part of a GPU change


def fit_batch_exp(runs, predict, split_host, field: str, first: tuple,
                  fixed: dict | None = None) -> tuple[tuple, dict]:
    """((compute_scale, host, comm, step offset), {compute_batch_exp, compute_ref_batch}): the GPU lines' error
    growing with the micro-batch b (what the profile's lines, each layer timed alone, miss in place), from the
    slope of what the fit `first` leaves (residual_batch_slope), added to the exponent and the scales refitted,
    a few rounds; kept only from BATCH_EXP_MIN and clipped at BATCH_EXP_MAX. ({} : none.) `fixed`: Calibration
    fields fitted before, held (as fit_time's)."""
    fixed = fixed or {}
    fit, batch = first, {}
    for _ in range(BATCH_EXP_ROUNDS):
        a, h, b, d = fit
        got = residual_batch_slope(runs, predict, Calibration(compute_scale=a, comm_scale=b, step_overhead_s=d,
                                                              **host_factors(field, h), **batch, **fixed))
        if got is None:
            break
        exp = max(-BATCH_EXP_MAX, min(BATCH_EXP_MAX, batch.get("compute_batch_exp", 0.0) + got[0]))
        if batch and abs(exp - batch["compute_batch_exp"]) < 0.002:
            break
        batch = {"compute_batch_exp": round(exp, 4), "compute_ref_batch": round(got[1], 4)}
        fit = fit_time(runs, predict, split_host, field, {**batch, **fixed})
    if not batch or abs(batch["compute_batch_exp"]) < BATCH_EXP_MIN:
        return first, {}
    return fit, batch


# a calibration run's host never waited on the device while it queued forward and backward when it had queued
# the backward this far or less into the device's time for it (train.py's host_backward_s / device_backward_s)
CLEAN_HOST_SHARE = 0.9


def replay_host_runs(runs) -> list[dict]:
    """The runs whose own host clock times the graphed layers' replays: one graphed stage, one micro-batch, no
    checkpointed (eager) layer, ZeRO-0 (no engine hooks), and a host that never waited on the device
    (CLEAN_HOST_SHARE): then the time until the host queued the backward is its launch work alone."""
    out = []
    for r in runs:
        p, m = r["plan"], r["measured"]
        hb, db = m.get("host_backward_s"), m.get("device_backward_s")
        if (p.cuda_graphs and p.pp_deg == 1 and p.chunks == 1 and p.zero_stage == 0 and not any(p.checkpoint)
                and hb and db and hb / db <= CLEAN_HOST_SHARE):
            out.append(r)
    return out


def fit_replay_host(runs, host_end) -> dict:
    """{"replay_host_scale": s} from replay_host_runs, or {} without one: per run the factor on the replays'
    host time (GRAPHED_LAYER_HOST_MS) that puts the model's host end of the micro-batch (`host_end(run, cal)`:
    when the host has queued its last backward) at the measured host_backward_s, the rest of the host's work
    (eager embeddings and head) as the model has it; their median, within the time factors' range.

    The replay time is an H200's probe; a calibration run's step time shows it only where the host bounds the
    step, which the graphed calibration runs rarely do, but every one of them clocks its host. Session 25's
    H100s queued T5-L's graphed batch-4 step in 16.3 ms where the model had 32.6, so its ZeRO-2 rows, whose host
    sets the step, came out 19-26 % over."""
    fs = []
    for r in replay_host_runs(runs):
        h0 = host_end(r, Calibration(replay_host_scale=0.0))
        h1 = host_end(r, Calibration(replay_host_scale=1.0))
        if h1 - h0 > 1e-6:
            fs.append((r["measured"]["host_backward_s"] - h0) / (h1 - h0))
    if not fs:
        return {}
    return {"replay_host_scale": round(min(SCALE_HI, max(SCALE_LO, statistics.median(fs))), 4)}


def fit_memory(runs, predict) -> tuple[float, float]:
    """(activation_scale, memory_offset_mb): least squares over every stage of every run, then the
    offset raised until no calibration stage is under-predicted."""
    pts = []  # (activation part, rest, measured)
    for r in runs:
        _, mem = predict(r, Calibration())
        for m, meas in zip(mem, r["measured"]["stage_peak_memory_mb"]):
            act = m["peak_activations_mb"]      # search.stage_memory: what activation_scale scales at the peak
            pts.append((act, m["total_mb"] - act, meas))
    if len({round(p[0], 3) for p in pts}) >= 2:
        # measured - rest = s * act + o: ordinary least squares in (s, o)
        xs = [p[0] for p in pts]
        ys = [p[2] - p[1] for p in pts]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        s = max(0.5, min(2.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var)) if var else 1.0
        o = my - s * mx
    else:
        s, o = 1.0, statistics.fmean(p[2] - p[0] - p[1] for p in pts)
    o += max(0.0, max(p[2] - (s * p[0] + p[1] + o) for p in pts))
    return s, o


def errors(runs, predict, cal: Calibration) -> dict:
    t, m = [], []
    for r in runs:
        step, mem = predict(r, cal)
        t.append((step - r["measured"]["step_time_s"]) / r["measured"]["step_time_s"])
        for s, meas in zip(mem, r["measured"]["stage_peak_memory_mb"]):
            m.append((s["total_mb"] - meas) / meas)
    return {"step_time_median_abs": statistics.median(abs(x) for x in t), "step_time_max_abs": max(abs(x) for x in t),
            "memory_median_abs": statistics.median(abs(x) for x in m), "memory_min_signed": min(m)}


def load_run(pair: str) -> dict:
    from autotune.validate import read_summary

    plan_path, _, metrics_path = pair.partition(":")
    if not metrics_path:
        raise ValueError(f"--run {pair!r}: give PLAN.json:METRICS.jsonl")
    plan = Plan.load(plan_path)
    return {"plan": plan, "measured": read_summary(metrics_path), "name": plan.describe(),
            "has_comm": plan.world_size > 1}


def calibrate(spec, hw, profile, fit_runs: list[dict], check_runs: list[dict], memory_only: bool = False,
              split_host: bool | str = False) -> dict:
    """`memory_only`: fit the memory factors and keep the time ones at identity (runs picked to pin
    memory, e.g. the no-OOM check's, are too few or too alike to fit a time model). `split_host`: fit
    host_scale apart from compute_scale, or "bound": only the factors the runs' bounds show (fit_time)."""
    def predict(r, cal):
        return predict_run(r["plan"], spec, hw, profile, cal)

    def host_end(r, cal):
        return evaluate_run(r["plan"], spec, hw, profile, cal).stage_costs[0].ordered[1]

    # the replays' host factor from the runs' host clocks, held through the time fit (bound-aware fits only:
    # --split-host none/both keep their one or two factors); the runs' bounds stay the uncalibrated model's
    # (with the factor in place ViT-L's batch-16 run read as GPU-bound, and its GPU lines took that run's host
    # work: the GPU-bound rows +3 %)
    replay = {} if memory_only or split_host != "bound" else fit_replay_host(fit_runs, host_end)
    if split_host == "bound":
        fit_runs = [{**r, "bound": factors_seen(r["plan"], spec, hw, profile)} for r in fit_runs]

    field = host_field([r["plan"] for r in fit_runs])
    a, h, b, d = (1.0, None, 1.0, 0.0) if memory_only else fit_time(fit_runs, predict, split_host, field, replay)
    batch = {}
    if not memory_only and split_host == "bound":
        (a, h, b, d), batch = fit_batch_exp(fit_runs, predict, split_host, field, (a, h, b, d), replay)
    s, o = fit_memory(fit_runs, predict)
    cal = Calibration(compute_scale=a, comm_scale=b, step_overhead_s=d, activation_scale=s, memory_offset_mb=o,
                      **host_factors(field, h), **batch, **replay)
    out = {**asdict(cal), "fitted_on": [r["name"] for r in fit_runs]}
    if split_host == "bound":
        out["fitted_bounds"] = [r["bound"] for r in fit_runs]
    for label, runs in (("fit", fit_runs), ("check", check_runs)):
        if runs:
            out[f"{label}_error_before"] = errors(runs, predict, Calibration())
            out[f"{label}_error_after"] = errors(runs, predict, cal)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default=None)
    ap.add_argument("--model-profile", required=True, help="profile to read and to write the calibration into")
    ap.add_argument("--hardware", default="1xH100")
    ap.add_argument("--run", action="append", required=True, help="PLAN.json:METRICS.jsonl (fitted)")
    ap.add_argument("--check", action="append", default=[], help="PLAN.json:METRICS.jsonl (scored only)")
    ap.add_argument("--memory-only", action="store_true", help="fit only activation_scale and memory_offset_mb")
    ap.add_argument("--split-host", choices=["none", "both", "bound"], default="bound",
                    help="the host's launch speed (host_scale) apart from the GPU's (compute_scale): 'bound' "
                         "(default) fits only the factors the runs' predicted steps respond to (launch-bound runs "
                         "and host-heavy optimizer steps the host's, GPU time the GPU's), 'both' always both "
                         "(needs runs of both kinds), 'none' one factor for both")
    args = ap.parse_args(argv)
    from autotune.hardware import load_hardware
    from autotune.model_profile import ModelProfile
    from model_zoo import get_model_spec

    try:
        fit_runs = [load_run(p) for p in args.run]
        check_runs = [load_run(p) for p in args.check]
        profile = ModelProfile.load(args.model_profile)
        hw = load_hardware(args.hardware).with_layout(fit_runs[0]["plan"].world_size)
        spec = get_model_spec(args.model, precision=fit_runs[0]["plan"].precision, task=args.task)
        result = calibrate(spec, hw, profile, fit_runs, check_runs, memory_only=args.memory_only,
                           split_host=SPLIT_MODES[args.split_host])
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ModelProfile.set_block(args.model_profile, "calibration", result)
    for k, v in result.items():
        print(f"{k:<22} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
