"""Measure many one-GPU configurations of train.py in one process (for the predicted-vs-measured sweep).

    python scripts/sweep_single_gpu.py --models bert-large,vit-large --steps 6 --out runs/sweep.jsonl

For each model it runs a fixed list of plans (micro-batch, chunks, checkpointing of the first k
layers, ZeRO stage, precision), each for `--steps` steps through train.py's own code path, and
appends one JSON line per configuration: the plan, the measured summary (step time without the
first step, peak allocated memory) or the error (out of memory), and the machine that ran it. Predictions are made afterwards,
on any machine, by scripts/sweep_report.py, so the GPU time goes to measuring only.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Anchor batch sizes (shared/reference/anchors.md) and a sequence of configurations around them.
ANCHORS = {"bert-large": 32, "vit-large": 64, "swin-base": 64, "t5-large": 16}
ZERO3_STEPS = 6          # train.py times the last 4 of them (autotune.validate.timed_steps)
CALIBRATION_RUNS = 3      # the first configurations of each list: what scripts/sweep_report.py calibrates on


def configs(model: str, num_layers: int) -> list[dict]:
    """About 29 plans per model (25 in bf16): batch x chunks x checkpointed prefix x ZeRO stage x precision.

    The first three are the ones scripts/sweep_report.py calibrates on (--calibrate 3), chosen to span
    what the time model separates: the anchor batch with ZeRO-1 (the search's one-GPU pick, mostly
    GPU-bound), a quarter of it (launch-bound: the host's speed) and the anchor batch in four
    micro-batches (what a micro-batch costs against what the optimizer step costs)."""
    b = ANCHORS.get(model, 16)
    half = num_layers // 2
    bf16 = lambda bsz, chunks=1, ckpt=0, zero=0: dict(bsz=bsz, chunks=chunks, ckpt=ckpt, zero=zero,  # noqa: E731
                                                       precision="bf16")
    out = [bf16(b, zero=1), bf16(b // 4), bf16(b, chunks=4)]
    out += [bf16(b), bf16(b // 2), bf16(2 * b, chunks=2), bf16(b, chunks=2), bf16(2 * b, chunks=2, zero=1),
            bf16(b // 2, zero=1), bf16(b // 4, zero=1), bf16(b, chunks=2, zero=1), bf16(2 * b, chunks=4, zero=1)]
    out += [bf16(b, ckpt=k) for k in (half // 2, half, num_layers)]
    out += [bf16(2 * b, ckpt=num_layers), bf16(2 * b, ckpt=half), bf16(b, ckpt=half, zero=1)]
    out += [bf16(b, zero=z) for z in (2, 3)]
    out += [bf16(b, chunks=2, zero=2), bf16(b // 2, zero=2), bf16(b, ckpt=half, zero=3)]
    out += [bf16(2 * b, zero=1), bf16(2 * b, ckpt=half, zero=2)]    # GPU-bound ZeRO-1 and ZeRO-2 at twice the anchor
    out += [dict(bsz=b // 2, chunks=1, ckpt=0, zero=0, precision="fp32"),
            dict(bsz=b // 2, chunks=1, ckpt=half, zero=0, precision="fp32"),
            dict(bsz=b // 2, chunks=1, ckpt=0, zero=1, precision="fp32"),
            dict(bsz=b // 4, chunks=2, ckpt=0, zero=2, precision="fp32")]
    return out


CONFIG_KEYS = {"bsz": int, "chunks": int, "ckpt": int, "zero": int, "precision": str}


def load_configs(path: str) -> dict[str, list[dict]]:
    """{model: [config, ...]} from a JSON file, replacing the built-in list for those models (a targeted
    check, e.g. configurations predicted before they are measured). Raises ValueError naming the problem."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--configs {path}: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"--configs {path}: expected {{model: [{{bsz, chunks, ckpt, zero, precision}}, ...]}}")
    for model, cfgs in data.items():
        for c in cfgs:
            bad = [k for k, t in CONFIG_KEYS.items() if not isinstance(c.get(k), t)]
            if bad or set(c) - set(CONFIG_KEYS):
                raise ValueError(f"--configs {path}: {model} entry {c} needs exactly {', '.join(CONFIG_KEYS)} "
                                 f"(wrong or missing: {', '.join(bad or sorted(set(c) - set(CONFIG_KEYS)))})")
    return data


def model_configs(model: str, num_layers: int, custom: dict[str, list[dict]],
                  precisions: set[str] | None = None) -> list[dict]:
    """The configurations to measure for `model`: from --configs (load_configs) when it names the model,
    else built in; only those of `precisions` when given (a GPU with profiles of one precision only)."""
    every = custom[model] if model in custom else configs(model, num_layers)
    return [c for c in every if precisions is None or c["precision"] in precisions]


def machine_id() -> str:
    """Which machine ran a record: host name and boot. The lent GPU machines run one configuration's launch-bound
    steps up to 1.7x apart (profiles/h200/runs/s16), so scripts/sweep_report.py calibrates each machine on its
    own runs."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def graph_args(plan, train_args: list[str]) -> list[str]:
    """train_args without --cuda-graphs for a configuration train.py would refuse to graph (ZeRO-3): a sweep
    asked for graphs runs them where they run, as `autotune/search.py --cuda-graphs` plans them."""
    from backends.deepspeed.graphs import plan_refusal

    if "--cuda-graphs" in train_args and plan_refusal(plan):
        return [a for a in train_args if a != "--cuda-graphs"]
    return train_args


def run_one(model: str, cfg: dict, steps: int, num_layers: int, train_args: list[str] = ()) -> dict:
    import torch

    import train
    from autotune.plan import Plan

    plan = Plan.uniform(num_layers=num_layers, world_size=1, global_bsz=cfg["bsz"], chunks=cfg["chunks"],
                        zero_stage=cfg["zero"], precision=cfg["precision"],
                        checkpoint=[1] * cfg["ckpt"] + [0] * (num_layers - cfg["ckpt"]), model={"name": model})
    train_args = graph_args(plan, list(train_args))
    plan.cuda_graphs = "--cuda-graphs" in train_args      # the record's plan is then predicted as graphs
    tmp = tempfile.mkdtemp()
    plan_path, metrics = os.path.join(tmp, "plan.json"), os.path.join(tmp, "m.jsonl")
    plan.save(plan_path)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    rec = {"model": model, "config": cfg, "plan": plan.to_json_dict(), "train_args": list(train_args),
           "started_at": t0, "machine": machine_id()}
    if torch.cuda.is_available():
        # what earlier configurations of this process still hold: part of this run's peak, which
        # scripts/sweep_report.py takes off (a ZeRO-1 ViT-L run left ~1 GB on an H200)
        rec["allocated_before_mb"] = torch.cuda.memory_allocated() / 2 ** 20
    try:
        rc = train.main(["--model", model, "--galvatron-plan", plan_path, "--steps", str(steps),
                         "--metrics-file", metrics, *train_args])
        rec["rc"] = rc
        if rc:          # refused before it ran (train.py printed why; e.g. --cuda-graphs on a CPU): no metrics
            raise RuntimeError(f"train.py exited {rc} before training (its message is in the log)")
        with open(metrics) as f:
            lines = [json.loads(x) for x in f if x.strip()]
        rec["steps"] = [x for x in lines if not x.get("summary")]
        rec["measured"] = [x for x in lines if x.get("summary")][-1]["measured"]
    except torch.cuda.OutOfMemoryError as e:
        rec["error"] = f"out of memory: {str(e).splitlines()[0]}"
    except Exception as e:  # noqa: BLE001 - a sweep records failures and goes on
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        _cleanup()
    rec["wall_s"] = time.time() - t0
    return rec


def _cleanup() -> None:
    import torch
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state
        parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001
        pass
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def process_groups(every: list[dict], chosen: list[int], calibration_repeats: int = 1,
                   per_config: bool = False, rounds: int = 1) -> list[list[int]]:
    """Indices into `every` that each fresh process runs, in order.

    Each chosen calibration configuration (the first CALIBRATION_RUNS) runs in a process of its own: a ZeRO-1
    run leaves 1-4 GB allocated that the next configuration of its process counts as its own peak (one H200:
    ViT-L batch 16 ZeRO-0 at 7615 MB after the ZeRO-1 anchor, 6612 MB alone; profiles/h200/runs/s12/c), and a
    calibration run's error moves every prediction. Then one process for the other ZeRO 0-2 configurations
    (`per_config`: one each) and one per ZeRO-3 configuration (its engine leaves ~12 GB allocated after it is
    destroyed: seen on an H100). Last, each calibration configuration again in `calibration_repeats` - 1 more
    processes: launch-bound steps differ between processes far more than within one (one H200: 103-167 ms
    for one Swin-B configuration), and scripts/sweep_report.py takes the median of the repeats.

    `rounds` R: all of that R times over, one round after the other, so that every configuration is the median
    of R processes spread over the call. One H200's speed drifted within a call: ViT-L batch 16 ZeRO-0 took 75
    ms in the call's first process and 56 ms in its last, batch 32 ZeRO-0 106 ms in the shared process between
    them (profiles/h200/runs/s14/c), so calibration runs and scored runs made at different times of the call
    disagreed by more than the model's error."""
    calibration = [i for i in chosen if i < CALIBRATION_RUNS]
    rest = [i for i in chosen if i >= CALIBRATION_RUNS]
    shared = [] if per_config else [[i for i in rest if every[i]["zero"] != 3]]
    alone = [[i] for i in rest if per_config or every[i]["zero"] == 3]
    groups = [[i] for i in calibration] + shared + alone
    groups += [[i] for _ in range(calibration_repeats - 1) for i in calibration]
    return [g for _ in range(rounds) for g in groups if g]


def spawn_groups(args: argparse.Namespace, custom: dict[str, list[dict]]) -> int:
    """Run each model's configurations in fresh processes (process_groups); no model inherits another's."""
    import subprocess

    from model_zoo import get_model_spec

    for model in args.models.split(","):
        every = model_configs(model, get_model_spec(model).num_layers, custom, args.precisions)
        chosen = list(range(len(every)))[args.skip: args.limit]
        groups = process_groups(every, chosen, args.calibration_repeats, args.process_per_config, args.rounds)
        for k, group in enumerate(groups):
            print(f"[sweep] {model}: process {k + 1} of {len(groups)}, configurations {group}", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--models", model, "--steps", str(args.steps),
                   "--only", ",".join(map(str, group)), "--out", args.out, f"--train-args={args.train_args}"]
            if args.precisions:
                cmd += ["--precisions", ",".join(sorted(args.precisions))]
            if args.configs:
                cmd += ["--configs", args.configs]
            if subprocess.run(cmd).returncode:
                print(f"[sweep] {model} configurations {group}: the process failed", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bert-large,vit-large,swin-base,t5-large")
    ap.add_argument("--steps", type=int, default=7, help="steps per configuration (the first is not timed)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many configurations per model")
    ap.add_argument("--skip", type=int, default=0, help="skip the first configurations of each model")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)   # "i,j,..": this process runs these
    ap.add_argument("--train-args", default="", help="extra train.py flags for every run, e.g. --train-args=--compile")
    ap.add_argument("--configs", default=None,
                    help="JSON file {model: [{bsz, chunks, ckpt, zero, precision}, ...]} measured instead of the "
                         "built-in list for the models it names")
    ap.add_argument("--precisions", default=None,
                    help="comma-separated: measure only the configurations of these precisions (e.g. bf16)")
    ap.add_argument("--process-per-config", action="store_true",
                    help="every configuration in a fresh process (about 10 s more each on a GPU; no run inherits "
                         "an earlier one's leftover memory)")
    ap.add_argument("--calibration-repeats", type=int, default=1,
                    help=f"measure each model's first {CALIBRATION_RUNS} configurations (the calibration runs) this "
                         f"many times, each in a fresh process (default 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole list this many times, round after round, each in its own processes; "
                         "scripts/sweep_report.py scores each configuration by the median of its runs (default 1)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    for flag, value in (("--calibration-repeats", args.calibration_repeats), ("--rounds", args.rounds)):
        if value < 1:
            print(f"error: {flag} {value}: give 1 or more", file=sys.stderr)
            return 2
    args.precisions = set(args.precisions.split(",")) if args.precisions else None
    if args.precisions and args.precisions - {"bf16", "fp16", "fp32"}:
        print(f"error: --precisions {','.join(sorted(args.precisions))}: use bf16, fp16 or fp32", file=sys.stderr)
        return 2
    try:
        custom = load_configs(args.configs) if args.configs else {}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    from model_zoo import get_model_spec

    if args.only is None:
        return spawn_groups(args, custom)
    for model in args.models.split(","):
        n = get_model_spec(model).num_layers
        every = model_configs(model, n, custom, args.precisions)
        for i in (int(x) for x in args.only.split(",")):
            cfg = every[i]
            # ZeRO-3 steps take seconds on one GPU (its hooks run per module): fewer of them
            steps = args.steps if cfg["zero"] != 3 else min(args.steps, ZERO3_STEPS)
            rec = run_one(model, cfg, steps, n, args.train_args.split())
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            m = rec.get("measured") or {}
            print(f"[sweep] {model} {cfg} -> {m.get('step_time_s', rec.get('error'))} s, "
                  f"peak {m.get('stage_peak_memory_mb')} MB, {m.get('samples_per_s')} samples/s "
                  f"({rec['wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
