"""Predicted against measured for a one-GPU sweep, with calibration on a few configurations per model.

    python scripts/sweep_report.py --sweep profiles/h100/sweep.jsonl --profiles profiles/h100 \
        --hardware 1xH100 --calibrate 3 --out docs/single_gpu_sweep.md

For each model: calibrate on the first `--calibrate` successful configurations (they are then not
scored, in any file: a later file's run of one is shown, not scored; one calibration per model, and per machine
where several ran all of them (FILE@NAME, or the records' `machine`): its memory
factors apply to every precision, its time factors to the precision it was fitted on, since they correct
that profile's host), predict every other configuration
with the model profile of its precision (<profiles>/<model>.json, or <profiles>/<precision>/<model>.json)
and the calibration, and tabulate the step-time and peak-memory errors. Writes a Markdown table (and a JSON file beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotune.calibrate import SPLIT_MODES, calibrate, evaluate_run, predict_run  # noqa: E402
from autotune.cost_model import Calibration  # noqa: E402
from autotune.plan import Plan, write_json_atomic, write_text_atomic  # noqa: E402
from autotune.validate import timed_steps  # noqa: E402


def load(paths: list[str]) -> dict[str, list[dict]]:
    """{model: records} from the sweep files, in the order given (a model's first records calibrate).
    FILE:MODEL[,MODEL...] takes only those models' records from FILE; FILE[:MODELS]@NAME says that NAME ran
    them (records since session 16 carry sweep_single_gpu.py's `machine`; older ones none: one machine);
    FILE!KEY=VALUE[,KEY=VALUE...] leaves out FILE's runs whose configuration has any of those values (runs of a
    runtime that has since changed for them, e.g. !zero=2 for ZeRO-2 over one rank before session 24)."""
    by_model: dict[str, list[dict]] = {}
    for spec in paths:
        spec, _, name = spec.rpartition("@") if "@" in spec else (spec, "", "")
        spec, _, drop = spec.partition("!")
        path, _, only = spec.partition(":")
        models = set(only.split(",")) if only else None
        dropped = [tuple(kv.split("=", 1)) for kv in drop.split(",") if kv]
        if any(len(kv) != 2 for kv in dropped):
            raise ValueError(f"--sweep {spec}!{drop}: give KEY=VALUE pairs after '!', e.g. !zero=2")
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if any(str(r["config"].get(k)) == v for k, v in dropped):
                        continue
                    if models is None or r["model"] in models:
                        by_model.setdefault(r["model"], []).append(
                            {**r, "source": path, "machine": name or r.get("machine") or ""})
    return by_model


def calibration_sets(ok: list[dict], n: int) -> dict[str, list[dict]]:
    """{machine: the runs that calibrate its rows}. The calibration configurations are the model's first n; a
    machine that ran all of them is calibrated on its own runs of them (calibration fits the host of its runs,
    and one H200 ran Swin-B's launch-bound calibration configurations 1.7x faster than another: its scored run was
    off by +41.6 % with the other's calibration, -0.2 % with its own; profiles/h200/runs/s16), any other on the
    model's first n runs, whichever machines ran them."""
    first = ok[:n]
    cfgs = [json.dumps(r["config"], sort_keys=True) for r in first]
    out = {}
    for machine in dict.fromkeys(r["machine"] for r in ok):
        own = {}
        for r in ok:
            key = json.dumps(r["config"], sort_keys=True)
            if r["machine"] == machine and key in cfgs:
                own.setdefault(key, r)
        out[machine] = [own[c] for c in cfgs] if len(own) == len(cfgs) else first
    return out


def steady(r: dict) -> dict:
    """The record with its step time taken again from its steps as train.py takes it now (autotune.validate.
    timed_steps): records before session 17 counted ZeRO-3's second step, still warm-up, among the timed ones.
    Samples/s and TFLOP/s follow the step time; a record without steps stays as it is."""
    steps = r.get("steps") or []
    if "measured" not in r or not steps:
        return r
    old = r["measured"]["step_time_s"]
    new = statistics.median(x["step_time_s"] for x in timed_steps(steps, r["config"]["zero"]))
    m = dict(r["measured"], step_time_s=new, samples_per_s=r["config"]["bsz"] / new)
    if m.get("tflops_per_gpu"):
        m["tflops_per_gpu"] *= old / new
    return dict(r, measured=m)


def held_before(r: dict) -> float | None:
    """MB that earlier configurations of the run's process still held when it started (sweep_single_gpu.py's
    allocated_before_mb, since session 12), shown beside the peak and not taken off it: on one H200 two ZeRO-1
    ViT-L runs left 1806 MB for the next runs of their process, and all 6 of those peaked at what session 11
    measured for them (within 7 MB; profiles/h200/runs/s13/a), so it was freed before their peaks. A
    ZeRO-0 run right after the ZeRO-1 anchor did count it in sessions 11-12 (7615 MB, 6612 alone)."""
    return r.get("allocated_before_mb")


FRESH_HELD_MB = 100.0      # a run that started with less held is one with nothing of earlier configurations in its peak


def fresh_memory(scored: list[dict]) -> dict:
    """Peak-memory errors over the scored runs that started with under FRESH_HELD_MB held (a fresh process, or the
    first of a shared one): a shared process's leftovers may sit in a later run's peak (held_before), which no
    model of one run predicts; these rows are what the memory target is judged on."""
    rows = [x for x in scored if (x["held_before_mb"] or 0.0) < FRESH_HELD_MB]
    if not rows:
        return {"scored": 0}
    return {"scored": len(rows), "mem_median_abs_err": statistics.median(abs(x["mem_err"]) for x in rows),
            "mem_worst_under": min(x["mem_err"] for x in rows),
            "uncalibrated_mem_median_abs_err": statistics.median(abs(x["uncalibrated_mem_err"]) for x in rows),
            "uncalibrated_mem_worst_under": min(x["uncalibrated_mem_err"] for x in rows)}


def host_share(r: dict) -> float | None:
    """Median over the timed steps of the time until the host had queued the last backward over the time until
    the device had finished it (train.py's host_backward_s / device_backward_s, since session 14): near 1 when
    the host's launches set the pace. Runs of sessions 12-13 have only host_s, which counts the wait at
    DeepSpeed's optimizer step (it reads the norm back): host_s / step_time_s for them, near 1 on every step."""
    timed = timed_steps(r.get("steps", []), r["config"]["zero"])
    new = [x["host_backward_s"] / x["device_backward_s"] for x in timed if x.get("device_backward_s")]
    if new:
        return statistics.median(new)
    old = [x["host_s"] / x["step_time_s"] for x in timed if "host_s" in x]
    return statistics.median(old) if old else None


def time_errors(rows: list[dict]) -> dict:
    """Median and max absolute step-time error of report rows, calibrated and uncalibrated (the same rows
    predicted before any run is seen: the profile alone)."""
    out = {}
    for prefix, key in (("", "time_err"), ("uncalibrated_", "uncalibrated_err")):
        errs = [abs(x[key]) for x in rows]
        out[f"{prefix}time_median_abs_err"], out[f"{prefix}time_max_abs_err"] = statistics.median(errs), max(errs)
    return out


def merge_repeats(recs: list[dict]) -> list[dict]:
    """One record per configuration and sweep file, at its first place: repeats of a measured configuration in
    one sweep (fresh processes, sweep_single_gpu.py --calibration-repeats) merge into the median step time and
    peak memory of them, with every step time kept under "repeats". The same configuration in another file
    (another session, other code) stays a row of its own."""
    groups: dict[str, list[dict]] = {}
    for r in recs:
        groups.setdefault(json.dumps([r.get("source"), r["config"]], sort_keys=True), []).append(r)
    out = []
    for same in groups.values():
        ok = [r for r in same if "measured" in r]
        if len(ok) < 2:
            out.append(ok[0] if ok else same[0])
            continue
        step = statistics.median(r["measured"]["step_time_s"] for r in ok)
        peaks = [statistics.median(m) for m in zip(*(r["measured"]["stage_peak_memory_mb"] for r in ok))]
        merged = dict(ok[0], measured={**ok[0]["measured"], "step_time_s": step, "stage_peak_memory_mb": peaks,
                                       "samples_per_s": ok[0]["config"]["bsz"] / step},
                      repeats=[r["measured"]["step_time_s"] for r in ok])
        tflops = ok[0]["measured"].get("tflops_per_gpu")
        if tflops:
            merged["measured"]["tflops_per_gpu"] = tflops * ok[0]["measured"]["step_time_s"] / step
        out.append(merged)
    return out


def repeat_noise(recs: list[dict]) -> dict:
    """How far one run of a configuration lies from the median of its repeats (merge_repeats' `repeats`: fresh
    processes of one sweep file): the median and the largest over every such run of |run / median - 1|, and how
    many configurations were repeated. The noise floor of a scored row, which is one run: on the lent H200s one
    launch-bound configuration took 103-167 ms in five processes (profiles/h200/runs/s11)."""
    sets = [r["repeats"] for r in recs if len(r.get("repeats", ())) >= 2]
    devs = [abs(t / statistics.median(s) - 1) for s in sets for t in s]
    return {"configurations": len(sets), "median_abs_dev": statistics.median(devs) if devs else None,
            "max_abs_dev": max(devs) if devs else None}


def profile_for(folder: str | None, model: str, precision: str):
    """The model profile of that precision: <folder>/<model>.json when it is, else <folder>/<precision>/<model>.json;
    None (analytic) when neither exists."""
    from autotune.model_profile import ModelProfile

    if not folder:
        return None
    for path in (os.path.join(folder, f"{model}.json"), os.path.join(folder, precision, f"{model}.json")):
        if os.path.exists(path):
            p = ModelProfile.load(path)
            if p.precision == precision:
                return p
    return None


def fit_calibration(fit: list[dict], specs: dict, profiles: dict, hw, split_host: str):
    """(the fitted factors, {precision: Calibration}) from calibration runs: time factors for the precision they
    were measured in (they scale that profile's host), memory factors for every precision."""
    if not fit:
        return None, {prec: Calibration() for prec in profiles}
    runs = [{"plan": r["plan_obj"], "measured": r["measured"], "name": r["name"], "has_comm": False} for r in fit]
    prec0 = fit[0]["plan_obj"].precision
    result = calibrate(specs[prec0], hw, profiles[prec0], runs, [], split_host=SPLIT_MODES[split_host])
    cal = Calibration.from_dict(result)
    memory_only = Calibration(activation_scale=cal.activation_scale, memory_offset_mb=cal.memory_offset_mb)
    return result, {prec: cal if prec == prec0 else memory_only for prec in profiles}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", required=True, nargs="+", help="sweep JSON-lines file(s) of sweep_single_gpu.py; FILE:MODEL,... keeps those models only; "
                         "FILE!zero=2 leaves out its runs with that value; FILE@NAME: NAME ran them (each machine that ran every calibration configuration is "
                         "calibrated on its own runs)")
    ap.add_argument("--profiles", default=None, help="folder with <model>.json model profiles (else analytic)")
    ap.add_argument("--hardware", default="1xH100")
    ap.add_argument("--calibrate", type=int, default=3)
    ap.add_argument("--split-host", choices=["none", "both", "bound"], default="bound",
                    help="the host's launch speed apart from the GPU's: as the calibration runs' bounds show "
                         "('bound', default), always ('both') or one factor for both ('none'); autotune/calibrate.py")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from autotune.hardware import load_hardware
    from model_zoo import get_model_spec

    hw = load_hardware(args.hardware)
    rows, summary = [], {}
    try:
        by_model = load(args.sweep)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for model, recs in by_model.items():
        recs = merge_repeats([steady(r) for r in recs])
        ok = [r for r in recs if "measured" in r]
        for r in ok:
            r["plan_obj"] = Plan.from_dict(r["plan"])
            # session-19 records ran --cuda-graphs before their plans said so
            r["plan_obj"].cuda_graphs |= "--cuda-graphs" in r.get("train_args", [])
            r["name"] = r["plan_obj"].describe()
        precisions = sorted({r["plan_obj"].precision for r in ok})
        profiles = {prec: profile_for(args.profiles, model, prec) for prec in precisions}
        specs = {prec: get_model_spec(model, precision=prec) for prec in profiles}
        # One calibration per model and machine (calibration_sets), from the model's first `--calibrate`
        # configurations whatever their precision (the budget: at most 3 calibration configurations
        # per model). Memory factors (activation
        # accounting, allocator offset) hold for every precision; time factors scale the profile they
        # were fitted against (its host's speed), so a profile of another precision keeps its own.
        # --calibrate 0: every configuration scored by the model alone (a check predicted before measuring).
        fits = calibration_sets(ok, args.calibrate)
        by_runs = {}        # machines without all the calibration runs share the model's first: fit it once
        for fit in fits.values():
            key = tuple(map(id, fit))
            if key not in by_runs:
                by_runs[key] = fit_calibration(fit, specs, profiles, hw, args.split_host)
        fitted_by = {m: by_runs[tuple(map(id, fit))] for m, fit in fits.items()}
        fitted = {id(r) for fit in fits.values() for r in fit}
        # a calibration configuration is not scored in any run of it: another file's run of it (an earlier
        # session's, say) is shown but kept out of the errors
        fitted_cfgs = {json.dumps(r["config"], sort_keys=True) for r in ok[: args.calibrate]}
        several = len(fits) > 1
        for r in recs:
            cfg = r["config"]
            if "measured" not in r:
                rows.append({"model": model, **cfg, "status": r.get("error", "failed")})
                continue
            prec = r["plan_obj"].precision
            ev0 = evaluate_run(r["plan_obj"], specs[prec], hw, profiles[prec], Calibration())
            step0, mem0 = ev0.step_time_s, ev0.stage_memory
            step, mem = predict_run(r["plan_obj"], specs[prec], hw, profiles[prec], fitted_by[r["machine"]][1][prec])
            meas_t = r["measured"]["step_time_s"]
            meas_m = r["measured"]["stage_peak_memory_mb"][0]
            own = all(f["machine"] == r["machine"] for f in fits[r["machine"]])
            reps = r.get("repeats")
            role = ("calibration" if id(r) in fitted else
                    "calibration configuration, another run" if json.dumps(cfg, sort_keys=True) in fitted_cfgs else
                    "scored") + (f" (median of {len(reps)}: {min(reps) * 1e3:.1f}-{max(reps) * 1e3:.1f} ms)"
                                 if reps else "") + (
                    f" [{r['machine'] or 'unnamed'}{'' if own else ', calibrated on another machine'}]"
                    if several else "") + (", CUDA graphs" if r["plan_obj"].cuda_graphs else "")
            rows.append({"model": model, **cfg, "status": role,
                         "measured_s": meas_t, "predicted_s": step, "uncalibrated_s": step0,
                         "time_err": (step - meas_t) / meas_t, "uncalibrated_err": (step0 - meas_t) / meas_t,
                         "measured_mb": meas_m, "held_before_mb": held_before(r), "predicted_mb": mem[0]["total_mb"],
                         "mem_err": (mem[0]["total_mb"] - meas_m) / meas_m,
                         "uncalibrated_mem_err": (mem0[0]["total_mb"] - meas_m) / meas_m,
                         "samples_per_s": r["measured"]["samples_per_s"],
                         "tflops": r["measured"].get("tflops_per_gpu"),
                         "bound": ev0.stage_costs[0].bound,
                         "host_share": host_share(r)})
        scored = [x for x in rows if x["model"] == model and x.get("status", "").startswith("scored")]
        gpu = [x for x in scored if x["bound"] == "GPU"]
        if scored:
            summary[model] = {
                "scored": len(scored), **time_errors(scored),
                # the scored rows the model expects the GPU to bound: where host speed does not set the time
                "gpu_bound": {"scored": len(gpu), **(time_errors(gpu) if gpu else {})},
                "mem_median_abs_err": statistics.median(abs(x["mem_err"]) for x in scored),
                "mem_worst_under": min(x["mem_err"] for x in scored),
                "uncalibrated_mem_median_abs_err": statistics.median(abs(x["uncalibrated_mem_err"]) for x in scored),
                "uncalibrated_mem_worst_under": min(x["uncalibrated_mem_err"] for x in scored),
                "fresh": fresh_memory(scored),
                "repeat_noise": repeat_noise(recs),
                "calibration": fitted_by[ok[0]["machine"]][0],
                **({"calibration_by_machine": {m: res for m, (res, _) in fitted_by.items()}} if several else {}),
                "profiles": {p: "measured" if v else "analytic" for p, v in profiles.items()},
            }
    lines = [f"# One-GPU sweep: predicted against measured ({hw.name})", "",
             f"Command: `python scripts/sweep_report.py --sweep {' '.join(args.sweep)} --profiles {args.profiles} "
             f"--hardware {args.hardware} --calibrate {args.calibrate}{'' if args.split_host == 'bound' else ' --split-host ' + args.split_host} "
             f"--out {args.out}`", "",
             "| model | scored | step time median abs err | max abs err | uncalibrated median / max | "
             "GPU-bound: scored, median / max | peak memory median abs err | worst under-prediction | "
             "uncalibrated memory median / worst under | fresh processes: scored, memory median / worst under, "
             "uncalibrated | repeated: configurations, one run off their median (median / max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        g = s["gpu_bound"]
        gpu_cell = f"{g['scored']}, {g['time_median_abs_err']:.1%} / {g['time_max_abs_err']:.1%}" if g["scored"] else "0"
        n = s["repeat_noise"]
        noise_cell = (f"{n['configurations']}, {n['median_abs_dev']:.1%} / {n['max_abs_dev']:.1%}"
                      if n["configurations"] else "0")
        f = s["fresh"]
        fresh_cell = (f"{f['scored']}, {f['mem_median_abs_err']:.1%} / {f['mem_worst_under']:+.1%}, "
                      f"{f['uncalibrated_mem_median_abs_err']:.1%} / {f['uncalibrated_mem_worst_under']:+.1%}"
                      if f["scored"] else "0")
        lines.append(f"| {m} | {s['scored']} | {s['time_median_abs_err']:.1%} | {s['time_max_abs_err']:.1%} | "
                     f"{s['uncalibrated_time_median_abs_err']:.1%} / {s['uncalibrated_time_max_abs_err']:.1%} | "
                     f"{gpu_cell} | {s['mem_median_abs_err']:.1%} | {s['mem_worst_under']:+.1%} | "
                     f"{s['uncalibrated_mem_median_abs_err']:.1%} / {s['uncalibrated_mem_worst_under']:+.1%} | "
                     f"{fresh_cell} | {noise_cell} |")
    lines += ["", f"fresh processes: the scored runs that started with under {FRESH_HELD_MB:.0f} MB held by earlier "
              "configurations of their process (held before), whose peaks hold nothing of those.", "",
              "repeated: configurations run in two or more fresh processes of one sweep file (the calibration "
              "repeats, sweep_single_gpu.py --rounds), and the median and the largest over those runs of how far one "
              "run lies from their median: the noise a scored row of one run carries. Such a configuration is one "
              "row at the median of its runs, with their range.", "",
              "bound: what the uncalibrated model expects to set a micro-batch's compute time (the host's launches "
              "or the GPU); host share: measured, the time until the host had queued the last backward over the time "
              "until the device had finished it (runs since session 14; near 1: launch-bound), for runs of sessions "
              "12-13 the time until the host had queued the step over the step time (near 1 on every step: it "
              "counts the wait at DeepSpeed's optimizer step, which reads the norm back); held before: MB that "
              "earlier configurations of the run's process still held when it started, when 100 MB or more (part of the measured peak only if not freed before it).", "",
              "| model | bsz | chunks | ckpt | ZeRO | prec | role | bound | host share | measured s | predicted s | err | "
              "uncal. err | measured MB | held before MB | predicted MB | err | samples/s | TFLOP/s |", "|" + "---|" * 19]
    for x in rows:
        if "measured_s" not in x:
            lines.append(f"| {x['model']} | {x['bsz']} | {x['chunks']} | {x['ckpt']} | {x['zero']} | "
                         f"{x['precision']} | {x['status']} |" + " |" * 12)
            continue
        share = f"{x['host_share']:.2f}" if x["host_share"] is not None else ""
        held = f"{x['held_before_mb']:.0f}" if (x["held_before_mb"] or 0) >= 100 else ""
        lines.append(f"| {x['model']} | {x['bsz']} | {x['chunks']} | {x['ckpt']} | {x['zero']} | {x['precision']} | "
                     f"{x['status']} | {x['bound']} | {share} | {x['measured_s']:.4f} | {x['predicted_s']:.4f} | "
                     f"{x['time_err']:+.1%} | {x['uncalibrated_err']:+.1%} | "
                     f"{x['measured_mb']:.0f} | {held} | {x['predicted_mb']:.0f} | {x['mem_err']:+.1%} | "
                     f"{x['samples_per_s']:.1f} | {x['tflops'] or 0:.1f} |")
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    write_json_atomic(os.path.splitext(args.out)[0] + ".json", {"summary": summary, "rows": rows})
    print("\n".join(lines[:6 + len(summary)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
