"""Predicted against measured: run a plan for a few steps and compare with the cost model.

    python autotune/validate.py --galvatron-plan plan.json --model bert-large --steps 10 \
        [--hardware 8xH100] [--model-profile profile.json] [--nproc 8] --out runs/validate

Runs train.py under torchrun (one process per rank of the plan; `--nproc 1` runs plain python),
reads its metrics summary, re-predicts the plan with the given hardware and model profile (so a
calibrated profile shows its effect), and writes `report.json` and `report.png` (predicted against
measured step time and per-stage peak memory) into `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotune.plan import Plan, PlanError, write_json_atomic  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_steps(records: list, zero_stage: int) -> list:
    """The steps that time the steady state: all but the first (warm-up), and under ZeRO-3 all but the first two.
    DeepSpeed's ZeRO-3 engine is still warming up in its second step: 3.2-26.2 s against 0.4-1.6 s for the steps
    after it, in every ZeRO-3 run of the H200 sweeps (sessions 13-17, profiles/h200/runs/s17/README.md). Counted
    as steady, it set the median of three timed steps to the slower of the other two. Fewer steps than that:
    the last one."""
    skip = 2 if zero_stage == 3 else 1
    return records[skip:] or records[-1:]


def rel_err(pred: float, meas: float) -> float:
    """Signed relative error of a prediction: positive = over-predicted."""
    return (pred - meas) / meas if meas else float("nan")


def predict(plan: Plan, model: str, hardware: str | None, profile_path: str | None, gpu_memory_gb: float | None,
            task: str | None = None, seq_len: int | None = None):
    """Re-predict `plan` (time, memory per stage) with the given inputs."""
    from autotune.hardware import load_hardware
    from autotune.search import Searcher
    from model_zoo import get_model_spec

    hw = load_hardware(hardware or plan.cluster.get("hardware") or "8xH100")
    if hw.world_size != plan.world_size:
        hw = hw.with_layout(plan.world_size)
    profile = None
    if profile_path:
        from autotune.model_profile import ModelProfile
        profile = ModelProfile.load(profile_path)
    spec = get_model_spec(model, precision=plan.precision, seq_len=seq_len, task=task)
    mem = gpu_memory_gb or plan.cluster.get("gpu_memory_gb") or hw.gpu_memory_gb
    ev = Searcher(spec, hw, mem, profile=profile).predict(plan)
    return ev, spec


def compare(plan: Plan, ev, measured: dict) -> dict:
    """The rows of the report: predicted, measured and relative error per quantity."""
    rows = [{"quantity": "step_time_s", "predicted": ev.step_time_s, "measured": measured["step_time_s"],
             "rel_err": rel_err(ev.step_time_s, measured["step_time_s"])}]
    for k, (mem, meas) in enumerate(zip(ev.stage_memory, measured["stage_peak_memory_mb"])):
        rows.append({"quantity": f"stage{k}_peak_memory_mb", "predicted": mem["total_mb"], "measured": meas,
                     "rel_err": rel_err(mem["total_mb"], meas)})
    return {"plan": plan.describe(), "rows": rows,
            # per stage, what the model expects to bound its compute; measured, the time until the host had
            # queued the last backward over the time until the device had finished it (train.py's host_share;
            # None under a pipeline or from a train.py before it): near 1, the CPU's speed sets the step
            "bound": {"predicted": [c.bound for c in ev.stage_costs],
                      "measured_host_share": measured.get("host_share")},
            "breakdown": {"time_s": [c.time_breakdown() for c in ev.stage_costs],
                          "memory_mb": ev.stage_memory}}


def plot(rows: list[dict], path: str, title: str) -> None:
    """Predicted against measured, one panel for time and one for memory (matplotlib, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, pick, unit in ((axes[0], "step_time", "s"), (axes[1], "memory", "MB")):
        sel = [r for r in rows if pick in r["quantity"]]
        xs = [r["measured"] for r in sel]
        ys = [r["predicted"] for r in sel]
        ax.scatter(xs, ys)
        for r in sel:
            ax.annotate(r["quantity"].replace("_peak_memory_mb", "").replace("_s", ""), (r["measured"], r["predicted"]),
                        fontsize=7)
        lim = max(xs + ys) * 1.1 if xs else 1
        ax.plot([0, lim], [0, lim], "k--", lw=0.8)
        ax.set_xlim(0, lim)
        ax.set_ylim(0, lim)
        ax.set_xlabel(f"measured ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_train(plan_path: str, nproc: int, train_args: list[str], metrics: str) -> int:
    """train.py's exit code (2: it refused the plan or an argument, and said why)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [os.path.join(ROOT, "train.py"), "--galvatron-plan", plan_path, "--metrics-file", metrics, *train_args]
    return subprocess.run(cmd).returncode


def read_summary_record(metrics_path: str) -> dict:
    """train.py's last summary line: {"measured": ..., "predicted": ... (when the plan has predictions)}."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    summaries = [r for r in records if r.get("summary")]
    if not summaries:
        raise RuntimeError(f"{metrics_path} has no summary line: did train.py finish?")
    return summaries[-1]


def read_summary(metrics_path: str) -> dict:
    return read_summary_record(metrics_path)["measured"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--galvatron-plan", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=None, help="processes to launch (default: the plan's world size)")
    ap.add_argument("--hardware", default=None, help="preset or file for the re-prediction (default: the plan's)")
    ap.add_argument("--model-profile", default=None)
    ap.add_argument("--gpu-memory-gb", type=float, default=None)
    ap.add_argument("--metrics", default=None, help="use an existing train.py metrics file instead of running")
    ap.add_argument("--out", default="runs/validate", help="folder for report.json and report.png")
    args, train_args = ap.parse_known_args(argv)
    try:
        plan = Plan.load(args.galvatron_plan)
        if plan.world_size is None:
            raise PlanError("the plan has no world_size; validate plans written by autotune/search.py")
        ev, spec = predict(plan, args.model, args.hardware, args.model_profile, args.gpu_memory_gb, args.task,
                           args.seq_len)
        plan.validate(num_layers=spec.num_layers)
    except (PlanError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = args.metrics
    if metrics is None:
        os.makedirs(args.out, exist_ok=True)
        metrics = os.path.join(args.out, "metrics.jsonl")
        extra = ["--model", args.model, "--steps", str(args.steps)] + (["--task", args.task] if args.task else [])
        rc = run_train(args.galvatron_plan, args.nproc or plan.world_size, extra + train_args, metrics)
        if rc:
            print(f"error: train.py exited with code {rc} (its message is above); nothing to compare",
                  file=sys.stderr)
            return rc
    report = compare(plan, ev, read_summary(metrics))
    report["inputs"] = {"plan": args.galvatron_plan, "hardware": args.hardware, "model_profile": args.model_profile}
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "report.json"), report)
    plot(report["rows"], os.path.join(args.out, "report.png"), f"{args.model}: {report['plan']}")
    print(f"{'quantity':<24} {'predicted':>12} {'measured':>12} {'error':>8}")
    for r in report["rows"]:
        print(f"{r['quantity']:<24} {r['predicted']:>12.4g} {r['measured']:>12.4g} {r['rel_err']:>+8.1%}")
    bound = report["bound"]
    share = bound["measured_host_share"]
    by = (", ".join(bound["predicted"]) if set(bound["predicted"]) != {"?"}
          else "unknown (the profile has no host / GPU split)")
    print(f"bound by (model, per stage): {by}; measured, the host queued the forward and backward in "
          f"{'?' if share is None else f'{share:.0%}'} of the time the device took to finish them")
    if "host" in bound["predicted"]:
        print("  launch-bound: this step follows the CPU's speed, which moves 20-60 % between runs on shared or "
              "virtual hosts (README, 'One-GPU sweep'); compare GPU-bound plans for the model's accuracy")
    print(f"Wrote {os.path.join(args.out, 'report.json')} and report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
