"""Convert a DeepSpeed checkpoint written by train.py --save-dir into a plain Hugging Face folder.

    python scripts/convert_checkpoint.py SAVE_DIR OUT_DIR [--nproc N] [--device cpu|gpu]

SAVE_DIR holds what train.py wrote: `latest` (the newest complete checkpoint), its tag folder, the
run's `plan.json` and `run.json` (model, task, sequence length). The checkpoint is sharded the way the
plan says (TP shards, pipeline stages, ZeRO partitions), so the conversion runs under the same world
size: this script starts the plan's number of processes itself (torchrun; on the CPU with gloo by
default, so no GPU is needed), each rebuilds its part of the model, loads its shard of the
checkpoint with DeepSpeed (train.py --resume), and the ranks gather the full weights into
save_pretrained output plus the original checkpoint's tokenizer files (train.py --export-hf).
Checkpoints trained in bf16/fp16 are read into fp32 models (their module weights; the optimizer is
not needed). The folder loads with plain `transformers.AutoModelFor...from_pretrained`.

To continue the run under a different plan, train from the export and keep the step counter:
    train.py --model OUT_DIR --start-step STEP ...        (weights kept, optimizer restarted)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXIT_BAD_INPUT = 2


def build_command(save_dir: Path, out_dir: Path, nproc: int | None, on_gpu: bool) -> tuple[list[str], int]:
    """The torchrun command line that converts `save_dir`'s latest checkpoint, and its step."""
    from autotune.plan import Plan, PlanError

    for name in ("latest", "plan.json", "run.json"):
        if not (save_dir / name).is_file():
            raise ValueError(f"{save_dir} has no '{name}'; give a folder written by train.py --save-dir")
    tag = (save_dir / "latest").read_text().strip()
    match = re.fullmatch(r"step(\d+)", tag)
    if not (save_dir / tag).is_dir() or match is None:
        raise ValueError(f"'latest' in {save_dir} names '{tag}', which is not a complete checkpoint folder stepN")
    try:
        plan = Plan.load(str(save_dir / "plan.json"))
    except PlanError as e:
        raise ValueError(str(e)) from None
    run = json.loads((save_dir / "run.json").read_text())
    world = plan.world_size or nproc
    if world is None:
        raise ValueError(f"{save_dir / 'plan.json'} does not say its world_size; give --nproc N, the number of "
                         f"processes that saved the checkpoint")
    if nproc is not None and nproc != world:
        raise ValueError(f"the checkpoint was saved by {world} processes; run the conversion with --nproc {world}")
    step = int(match.group(1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(REPO / "train.py"), "--model", run["model"], "--task", run["task"], "--seed", str(run.get("seed", 1234)),
           "--galvatron-plan", str(save_dir / "plan.json"), "--save-dir", str(save_dir), "--resume",
           "--steps", str(step), "--export-hf", str(out_dir)]
    for flag, key in (("--seq-len", "seq_len"), ("--num-labels", "num_labels")):
        if run.get(key) is not None:
            cmd += [flag, str(run[key])]
    if not on_gpu or plan.precision == "fp32":
        cmd += ["--precision", "fp32"]
    if not on_gpu and plan.precision != "fp32":
        cmd.append("--resume-weights-only")      # bf16/fp16 module weights into an fp32 CPU model
    return cmd, step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("save_dir", help="train.py --save-dir folder")
    p.add_argument("out_dir", help="HF checkpoint folder to write (replaced atomically)")
    p.add_argument("--nproc", type=int, default=None, help="processes (default: the plan's world size)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: gloo processes, no GPU needed (default); gpu: one GPU per process")
    args = p.parse_args(argv)
    try:
        cmd, step = build_command(Path(args.save_dir).resolve(), Path(args.out_dir).resolve(), args.nproc,
                                  args.device == "gpu")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("OMP_NUM_THREADS", "1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    code = subprocess.call(cmd, cwd=REPO, env=env)
    if code == 0:
        print(f"converted step {step} of {args.save_dir} to {args.out_dir}; to continue under any plan: "
              f"train.py --model {args.out_dir} --start-step {step} ...")
    return code


if __name__ == "__main__":
    sys.exit(main())
