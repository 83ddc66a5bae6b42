"""Train a Hugging Face BERT/T5/ViT/Swin model under a Galvatron plan on DeepSpeed + Megatron-core.

    deepspeed [--hostfile hosts | --num_gpus N] train.py --galvatron-plan plan.json --model bert-large ...
    torchrun --nproc_per_node N train.py --galvatron-plan plan.json ...
    python train.py --model bert-test --steps 10            # one process, one-strategy plan from flags

Without --galvatron-plan the flags --pp --tp --zero-stage --chunks --checkpoint --precision make a
one-strategy plan (Plan.uniform), which then goes through the same translation layer.
Bad input (no plan file, plan for another world size, unknown model) ends with one line naming the
fix and exit code 2.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
GC_EVERY = 50                     # steps between manual garbage collections (automatic GC is off while training)
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="preset name (e.g. bert-large), HF config .json, or HF checkpoint folder")
    p.add_argument("--task", default=None, help="task (bert: mlm|text-classification; t5: seq2seq; vit/swin: "
                                                "image-classification); default: the family's")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (deterministic from --seed and the step), or a local dataset: a save_to_disk "
                        "folder, an image-folder tree (one sub-folder per class), or a .json/.jsonl/.csv/.parquet/"
                        ".txt file; records: text+label (BERT), source+target (T5), image+label (ViT/Swin), or "
                        "token ids / pixel_values; text is tokenized by the --model folder's tokenizer")
    p.add_argument("--eval-data", default=None, metavar="PATH",
                   help="evaluation set (same formats as --data): loss, and accuracy for classification, every "
                        "--eval-every steps and after the last step")
    p.add_argument("--eval-every", type=int, default=0, metavar="N", help="evaluate every N steps (0: only at the end)")
    p.add_argument("--dropout", type=float, default=None, metavar="P",
                   help="set every dropout probability of the model config to P (0 for exact comparisons between "
                        "layouts: dropout streams differ); the exported config keeps the checkpoint's values")
    p.add_argument("--num-labels", type=int, default=None,
                   help="classes of a classification head (default: the config's); a checkpoint's head of another "
                        "size is re-initialized")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--global-batch-size", type=int, default=None, help="default: the plan's global_bsz (8 without a plan)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (text models); default: the preset's")
    p.add_argument("--metrics-file", default=None, help="JSON lines: one per step, then a summary")
    p.add_argument("--save-dir", default=None, help="DeepSpeed checkpoint after the last step (tag stepN, 'latest' "
                                                   "names the newest complete one)")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="also save every N steps (needs --save-dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --save-dir (model, optimizer, and the step: the "
                        "next batches are those an uninterrupted run would see); starts fresh if there is none")
    p.add_argument("--resume-weights-only", action="store_true",
                   help="with --resume: load only the model weights (optimizer restarts); e.g. a bf16 GPU "
                        "checkpoint read by an fp32 CPU run (scripts/convert_checkpoint.py)")
    p.add_argument("--start-step", type=int, default=0, metavar="N",
                   help="begin at step N of the data schedule (continue a run from an HF export of its step-N "
                        "checkpoint under another plan: weights kept, optimizer restarted)")
    p.add_argument("--export-hf", default=None, metavar="DIR",
                   help="after the last step, gather the trained weights into the full HF layout and save_pretrained "
                        "them (plus the --model folder's tokenizer files) to DIR, atomically")
    p.add_argument("--galvatron-plan", default=None, help="plan.json from autotune/search.py")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile every Transformer layer (one graph serves all equal layers; the first steps "
                        "compile); MODE is torch.compile's. reduce-overhead adds CUDA graphs (pp = 1; checkpointed "
                        "layers stay eager): on one H100 ViT-L 47 %% of the bf16 GEMM ceiling against 35-43 %% eager, "
                        "T5-large 2.2x (README). Predictions and profiles are for uncompiled layers")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each plain Transformer layer's eager kernels as a CUDA graph, captured after the "
                        "first step: the host's launch cost leaves the step (one GPU, TP 1, ZeRO 0-2; "
                        "checkpointed layers stay eager; a plan's cuda_graphs: true does the same; README)")
    g = p.add_argument_group("one-strategy plan (used without --galvatron-plan)")
    g.add_argument("--pp", type=int, default=1)
    g.add_argument("--tp", type=int, default=1)
    g.add_argument("--tp-consecutive", type=int, choices=(0, 1), default=1)
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0)
    g.add_argument("--chunks", type=int, default=1, help="micro-batches per step (gradient accumulation / pipeline)")
    g.add_argument("--checkpoint", type=int, choices=(0, 1), default=0, help="activation checkpointing of every layer")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default: the plan's on GPU, fp32 on CPU")
    m = p.add_argument_group("dry-run memory check (before the model is built)")
    m.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="device memory to check the plan against (default: the GPU's; on CPU no check unless given)")
    m.add_argument("--model-profile", default=None,
                   help="model profile for the check (default: the one the plan was searched with, else analytic)")
    m.add_argument("--force", action="store_true", help="run even if the plan is predicted not to fit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


class BadInput(Exception):
    """User input that cannot run; the message names the fix."""


@dataclass
class ModelChoice:
    name: str
    config: Any
    family: str
    task: str
    seq_len: Any
    checkpoint_dir: Path | None        # HF checkpoint folder holding weights, if any
    export_config: Any = None          # the config an export saves (the checkpoint's dropout, not --dropout's)


def resolve_model(name: str, task: str | None, seq_len: int | None) -> ModelChoice:
    from model_zoo.registry import FAMILIES, PRESETS, ModelInputError, default_task, load_hf_config
    from model_zoo.runtime import get_adapter

    try:
        config = load_hf_config(name)
    except ModelInputError as e:
        raise BadInput(str(e)) from None
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise BadInput(f"model '{name}' has model_type '{config.model_type}'; use a {', '.join(FAMILIES)} config")
    try:
        task = get_adapter(family).check_task(task or default_task(config, PRESETS.get(name)))
    except ValueError as e:
        raise BadInput(str(e)) from None
    if seq_len is None and name in PRESETS:
        seq_len = PRESETS[name].seq_len
    path = Path(name).expanduser()
    has_weights = path.is_dir() and any(path.glob("*.safetensors")) or path.is_dir() and any(path.glob("*.bin"))
    return ModelChoice(name, config, family, task, seq_len, path if has_weights else None)


def configure_model(args: argparse.Namespace, adapter, choice: ModelChoice) -> None:
    """Apply --num-labels and --dropout to the config; the export keeps the checkpoint's dropout."""
    import copy

    if args.num_labels is not None:
        if args.num_labels < 1 or not hasattr(choice.config, "num_labels"):
            raise BadInput(f"--num-labels {args.num_labels}: give a positive number for a classification head")
        choice.config.num_labels = args.num_labels       # also resets id2label / label2id
    choice.export_config = copy.deepcopy(choice.config)
    if args.dropout is not None:
        adapter.set_dropout(choice.config, args.dropout)


# plan fields that decide how a DeepSpeed checkpoint is sharded (a resume must match them)
CHECKPOINT_LAYOUT_KEYS = ("world_size", "pp_deg", "tp_sizes_enc", "tp_consecutive_flags", "pp_division", "vtp",
                          "zero_stage", "dp_types_enc")


def check_resume_plan(save_dir: str, plan) -> None:
    """--resume under a plan that shards differently from the saved one: say how to switch plans."""
    from autotune.plan import Plan, PlanError

    saved_path = Path(save_dir) / "plan.json"
    if not (Path(save_dir) / "latest").is_file() or not saved_path.is_file():
        return
    try:
        saved = Plan.load(str(saved_path))
    except PlanError:
        return
    differ = [k for k in CHECKPOINT_LAYOUT_KEYS if getattr(saved, k) != getattr(plan, k)]
    if differ:
        raise BadInput(f"--resume: the checkpoint in {save_dir} was saved under another plan ({saved.describe()}; "
                       f"differs in {', '.join(differ)}); to continue under this plan convert it first: "
                       f"python scripts/convert_checkpoint.py {save_dir} OUT, then train.py --model OUT "
                       f"--start-step STEP (the script prints the step; the optimizer restarts)")


def make_plan(args: argparse.Namespace, num_layers: int, world_size: int, on_gpu: bool):
    """The plan to run: loaded and checked against this launch, or one strategy from the flags."""
    from autotune.plan import Plan, PlanError

    try:
        if args.galvatron_plan:
            plan = Plan.load(args.galvatron_plan)
            plan.validate(world_size=world_size, num_layers=num_layers)
            if args.global_batch_size and args.global_batch_size != plan.global_bsz:
                raise PlanError(f"--global-batch-size {args.global_batch_size} differs from the plan's global_bsz "
                                f"{plan.global_bsz}; drop the flag or search a plan for that batch size")
        else:
            if world_size % (args.pp * args.tp):
                raise PlanError(f"--pp {args.pp} x --tp {args.tp} needs a multiple of {args.pp * args.tp} processes, "
                                f"{world_size} were launched; change --pp/--tp or the number of processes")
            plan = Plan.uniform(num_layers=num_layers, world_size=world_size, pp=args.pp, tp=args.tp,
                                zero_stage=args.zero_stage, chunks=args.chunks, global_bsz=args.global_batch_size or 8,
                                checkpoint=args.checkpoint, tp_consecutive=args.tp_consecutive,
                                precision=args.precision or ("bf16" if on_gpu else "fp32"))
        if args.precision:
            plan.precision = args.precision
        elif not on_gpu and plan.precision != "fp32":
            plan.precision = "fp32"           # CPU runs (tests, debugging) train in fp32
        from backends.megatron.groups import check_executable
        check_executable(plan)
        return plan
    except PlanError as e:
        raise BadInput(str(e)) from None


def check_memory(args: argparse.Namespace, plan, choice: ModelChoice, on_gpu: bool) -> None:
    """Refuse a plan whose predicted peak exceeds the device memory, before any weight exists."""
    if args.force:
        return
    if args.gpu_memory_gb is not None:
        mem = args.gpu_memory_gb
    elif on_gpu:
        import torch

        mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    else:
        return                      # CPU run without a budget: nothing to check against
    from autotune.memory_check import check_plan_memory
    from model_zoo.registry import get_model_spec

    from autotune.model_profile import ModelProfile, ProfileError, find_profile

    profile, path = None, args.model_profile
    recorded = (plan.search or {}).get("model_profile")
    if path is None and recorded:          # the profile the search predicted the plan with
        path = find_profile(recorded)
        if path is None:
            print(f"train.py: the plan was searched with the model profile {recorded}, which is not here: "
                  "checking its memory with the analytic model (give --model-profile FILE)", file=sys.stderr)
    if path:
        try:
            profile = ModelProfile.load(path)
        except ProfileError as e:
            raise BadInput(str(e)) from None
    spec = get_model_spec(choice.name, precision=plan.precision, seq_len=choice.seq_len, task=choice.task)
    verdict = check_plan_memory(plan, spec, mem, profile=profile)
    if not verdict.ok:
        raise BadInput(verdict.message())


def open_data(spec: str, adapter, choice: ModelChoice, seed: int, flag: str = "--data"):
    """(dataset, tokenize) for a dataset PATH, (None, None) for synthetic data; checks the first record
    and, for classification, that every label fits the head."""
    if spec == "synthetic":
        return None, None
    from backends.data import load_records

    try:
        dataset = load_records(spec, flag)
    except (ValueError, FileNotFoundError) as e:
        raise BadInput(str(e)) from None
    if len(dataset) == 0:
        raise BadInput(f"{flag} {spec} holds no records; give a non-empty dataset")
    tokenize = None
    columns = set(dataset.column_names)
    if adapter.text_fields and set(adapter.text_fields) <= columns and "input_ids" not in columns:
        tokenize = make_tokenizer(adapter, choice)
    first = dataset[0]
    if tokenize is not None:
        first = tokenize(first)
    try:
        adapter.collate(choice.config, choice.task, [first], seed, 0, seq_len=choice.seq_len)
    except (KeyError, NotImplementedError, TypeError, ValueError) as e:
        raise BadInput(f"{flag} {spec}: {e.args[0] if e.args else e}") from None
    label_key = next((k for k in ("label", "labels") if k in columns), None)
    num_labels = getattr(choice.config, "num_labels", 0)
    if choice.task.endswith("classification") and label_key and num_labels > 1:
        labels = dataset[label_key]
        if labels and not all(isinstance(x, int) and 0 <= x < num_labels for x in labels):
            raise BadInput(f"{flag} {spec}: labels must be integers 0..{num_labels - 1} for a head of {num_labels} "
                           f"classes (found {sorted(set(labels))[:5]}...); set --num-labels or fix the labels")
    return dataset, tokenize


def make_tokenizer(adapter, choice: ModelChoice):
    """Tokenize a record's text fields (adapter.text_fields) with the --model checkpoint folder's tokenizer."""
    folder = Path(choice.name).expanduser()
    if not folder.is_dir() or not any(folder.glob("tokenizer*")) and not any(folder.glob("vocab*")):
        raise BadInput(f"the data has text fields ({', '.join(adapter.text_fields)}) but no 'input_ids', and --model "
                       "has no tokenizer files; give --model an HF checkpoint folder with its tokenizer, or "
                       "pre-tokenize into input_ids")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def tokenize(record: dict) -> dict:
        return adapter.tokenize(tokenizer, record, choice.seq_len)

    return tokenize


def initial_model(adapter, choice: ModelChoice, seed: int):
    """The full model every rank starts from: the checkpoint's weights in fp32 (read once; a head the
    checkpoint lacks, or one of another size from --num-labels, starts from a seeded init), or a seeded
    init."""
    import torch

    torch.manual_seed(seed)
    if choice.checkpoint_dir is None:
        return adapter.build_model(choice.config, choice.task)
    with torch.device("meta"):                # only the class: no second full copy of the weights
        cls = type(adapter.build_model(choice.config, choice.task))
    return cls.from_pretrained(str(choice.checkpoint_dir), config=choice.config, dtype=torch.float32,
                               ignore_mismatched_sizes=True).train()


def initial_state_dict(adapter, choice: ModelChoice, seed: int) -> dict:
    """One full state dict every rank (and a single-process reference) starts from."""
    return initial_model(adapter, choice, seed).state_dict()


def host_peak_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux reports KiB


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return host_peak_mb()


class Metrics:
    """Rank 0 writes one JSON line per step and a summary; everybody contributes peak memory."""

    def __init__(self, path: str | None, rank: int):
        self.rank = rank
        self.file = open(path, "w") if (path and rank == 0) else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def gather_floats(value: float) -> list[float]:
    import torch
    import torch.distributed as dist

    from backends.deepspeed.engine import device

    t = torch.tensor([value], dtype=torch.float64, device=device())
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x) for x in out]


def summarize(plan, groups, records: list[dict], peaks: list[float], flops: float) -> dict:
    import statistics

    from autotune.validate import timed_steps

    timed = timed_steps(records, plan.zero_stage)   # without the warm-up steps
    step_time = statistics.median(r["step_time_s"] for r in timed)   # steady state: robust to host hiccups
    block = groups.world_size // plan.pp_deg
    stage_peak = [max(peaks[k * block:(k + 1) * block]) for k in range(plan.pp_deg)]
    measured = {"step_time_s": step_time, "samples_per_s": plan.global_bsz / step_time,
                "tflops_per_gpu": flops * plan.global_bsz / step_time / groups.world_size / 1e12,
                "stage_peak_memory_mb": stage_peak, "rank_peak_memory_mb": peaks,
                "final_loss": records[-1]["loss"] if records else None,
                "host_s": statistics.median(r["host_s"] for r in timed),
                "host_cpu_s": statistics.median(r["host_cpu_s"] for r in timed)}
    for key in ("host_backward_s", "device_backward_s"):
        values = [r[key] for r in timed if r.get(key) is not None]
        measured[key] = statistics.median(values) if values else None
    # the measured bound: above LAUNCH_BOUND the host's launches set the pace (None under a pipeline)
    measured["host_share"] = (measured["host_backward_s"] / measured["device_backward_s"]
                              if measured["device_backward_s"] else None)
    summary = {"summary": True, "plan": plan.describe(), "measured": measured}
    if plan.predicted:
        keys = ("step_time_s", "samples_per_s", "stage_peak_memory_mb", "stage_bound")
        summary["predicted"] = {k: plan.predicted.get(k) for k in keys if k in plan.predicted}
    return summary


def print_summary(summary: dict, log) -> None:
    m, p = summary["measured"], summary.get("predicted", {})
    log(f"plan: {summary['plan']}")
    rows = [("step time (s)", "step_time_s"), ("samples/s", "samples_per_s"),
            ("peak memory per stage (MB)", "stage_peak_memory_mb")]
    for label, key in rows:
        line = f"  {label:28s} measured {_fmt(m.get(key))}"
        if key in p:
            line += f"   predicted {_fmt(p[key])}"
        log(line)
    log(f"  {'achieved TFLOP/s per GPU':28s} measured {_fmt(m['tflops_per_gpu'])}")
    known = [b for b in p.get("stage_bound") or [] if b != "?"]      # '?': a profile without host/GPU sums
    bound = f"; the model expects {'/'.join(p['stage_bound'])}-bound stages" if known else ""
    share = m.get("host_share")
    if share is not None:
        log(f"  {'forward+backward (s)':28s} measured: queued by the host in {_fmt(m['host_backward_s'])}, done on the "
            f"device at {_fmt(m['device_backward_s'])} ({share:.0%}: {'launch' if share > LAUNCH_BOUND else 'GPU'}-bound"
            f"{bound})")
    else:
        log(f"  {'host queued the step in (s)':28s} measured {_fmt(m['host_s'])}{bound}")


# host_backward_s / device_backward_s above this: the device finished the backward right after the host queued it
LAUNCH_BOUND = 0.9


def backward_times(result, t0: float) -> dict[str, float | None]:
    """The step record's host_backward_s and device_backward_s (engine.StepResult; None under a pipeline)."""
    if result.backward_queued_at is None:
        return {"host_backward_s": None, "device_backward_s": None}
    return {"host_backward_s": result.backward_queued_at - t0, "device_backward_s": result.device_backward_s()}


def _fmt(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def save_checkpoint(args: argparse.Namespace, trainer, plan, choice: ModelChoice, step: int, rank: int) -> None:
    """Collective: the DeepSpeed checkpoint of `step` in --save-dir, with the run's plan.json, ds_config.json
    and run.json beside it (what a resume or scripts/convert_checkpoint.py needs)."""
    from autotune.plan import write_json_atomic

    if rank == 0:
        write_json_atomic(os.path.join(args.save_dir, "ds_config.json"), trainer.ds_config)
        plan.save(os.path.join(args.save_dir, "plan.json"))
        write_json_atomic(os.path.join(args.save_dir, "run.json"), run_record(args, choice))
    trainer.save(args.save_dir, tag=f"step{step}", client_state={"step": step})


def run_record(args: argparse.Namespace, choice: ModelChoice) -> dict:
    """What scripts/convert_checkpoint.py needs besides plan.json to rebuild this run's model."""
    path = Path(args.model).expanduser()
    return {"model": str(path.resolve()) if path.exists() else args.model, "task": choice.task,
            "seq_len": args.seq_len, "num_labels": args.num_labels, "seed": args.seed}


def run_eval(trainer, eval_data, loss_fn, tp_rank: int, step: int, metrics: Metrics, log) -> None:
    from backends.evaluate import evaluate

    result = evaluate(trainer, eval_data, loss_fn, tp_rank)
    metrics.write({"eval": True, "step": step, **result})
    acc = result["eval_accuracy"]
    log(f"eval after step {step} | loss {_fmt(result['eval_loss'])}"
        + (f" | accuracy {acc:.4f}" if acc is not None else "") + f" | {result['eval_samples']} samples")


def export_hf(trainer, layout, adapter, choice: ModelChoice, out_dir: str, rank: int, log) -> None:
    """Gather the trained weights (collective) and let rank 0 write them as an HF checkpoint folder."""
    import torch.distributed as dist

    from backends.export import save_hf, to_hf_state_dict

    full = trainer.full_state_dict(layout)
    if rank == 0:
        hf_model = adapter.build_model(choice.export_config or choice.config, choice.task)
        path = save_hf(hf_model, to_hf_state_dict(full, hf_model), out_dir, tokenizer_dir=choice.checkpoint_dir)
        log(f"exported the trained model in HF format to {path}")
    dist.barrier()


def train(args: argparse.Namespace) -> int:
    import torch

    from backends.gc_pause import automatic_gc_off

    on_gpu = torch.cuda.is_available()
    if not on_gpu and "OMP_NUM_THREADS" not in os.environ:
        # CPU runs are tests and debugging; intra-op threads that spin-wait on a shared or busy machine
        # make tiny models 100x slower (torchrun sets the same default)
        torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.steps < 1:
        raise BadInput("--steps must be at least 1")
    if (args.resume or args.save_every) and not args.save_dir:
        raise BadInput("--resume and --save-every need --save-dir (the checkpoint folder)")
    if args.save_every < 0:
        raise BadInput("--save-every must be 0 (off) or a positive number of steps")
    if args.eval_every < 0 or args.eval_every and not args.eval_data:
        raise BadInput("--eval-every needs --eval-data PATH and a number of steps >= 1")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise BadInput(f"--dropout {args.dropout}: give a probability in [0, 1)")
    if args.eval_data == "synthetic":
        raise BadInput("--eval-data needs a dataset PATH (synthetic data has nothing to hold out)")
    if args.start_step < 0 or args.start_step and args.resume:
        raise BadInput("--start-step N (>= 0) continues from an HF export; with --resume the step comes from the "
                       "checkpoint: drop one of them")
    choice = resolve_model(args.model, args.task, args.seq_len)
    from model_zoo.runtime import get_adapter

    adapter = get_adapter(choice.family)
    configure_model(args, adapter, choice)
    plan = make_plan(args, adapter.num_layers(choice.config), world_size, on_gpu)
    from backends.deepspeed.engine import check_compile_mode
    from backends.deepspeed.graphs import graph_refusal

    if args.cuda_graphs and not plan.cuda_graphs:
        plan.cuda_graphs = True     # memory-checked and run as graphs
        plan.predicted = None       # the search predicted eager layers: no prediction to print beside graphs
    if plan.cuda_graphs and (refusal := graph_refusal(plan, args.compile, on_gpu)):
        raise BadInput(refusal + ("" if args.cuda_graphs else " (the plan sets cuda_graphs: set it to false)"))
    check_memory(args, plan, choice, on_gpu)
    try:
        check_compile_mode(plan, args.compile)
    except ValueError as e:
        raise BadInput(str(e)) from None
    dataset, tokenize = open_data(args.data, adapter, choice, args.seed)
    eval_set, eval_tokenize = (open_data(args.eval_data, adapter, choice, args.seed, "--eval-data")
                               if args.eval_data else (None, None))
    if args.resume:
        check_resume_plan(args.save_dir, plan)

    # ---- heavy imports and process groups only once the input is known to be good
    import torch.distributed as dist
    from tqdm import tqdm

    from autotune.plan import write_json_atomic
    from backends.data import FileData, SyntheticData
    from backends.deepspeed.engine import build_engine
    from backends.megatron.groups import build_parallel_groups, destroy_parallel_groups, init_distributed
    from backends.megatron.random import seed_everything

    from backends.launch import LaunchError, check_master_reachable
    try:
        # Ranks other than 0 stop with one line instead of waiting out the rendezvous timeout.
        check_master_reachable(timeout_s=float(os.environ.get("GALVATRON_MASTER_TIMEOUT_S", "120")))
    except LaunchError as e:
        raise BadInput(str(e)) from None
    init_distributed()
    groups = build_parallel_groups(plan)
    seed_everything(args.seed, groups.rng_rank, groups.pp_rank)
    log = tqdm.write if rank == 0 else (lambda *_: None)

    before_load = host_peak_mb()
    model = initial_model(adapter, choice, args.seed)
    adapter.tensor_parallelize(model, choice.task, groups.tp_groups)
    load_peaks = gather_floats(host_peak_mb())
    load_growth = gather_floats(host_peak_mb() - before_load)
    log(f"loaded {'the checkpoint ' + str(choice.checkpoint_dir) if choice.checkpoint_dir else 'seeded weights'}: "
        f"peak host memory per rank {_fmt(load_peaks)} MB (+{_fmt(load_growth)} MB while loading; every rank "
        f"reads the full state dict, then keeps its shard)")
    layout = None
    if args.export_hf:
        from backends.export import capture_layout

        layout = capture_layout(model, groups.tp_groups.vocab)
    seq = adapter.layer_sequence(model, choice.task)
    trainer = build_engine(plan, groups, seq, lr=args.lr, weight_decay=args.weight_decay,
                           compile_mode=args.compile, cuda_graphs=plan.cuda_graphs)
    if rank == 0:
        if args.galvatron_plan:
            cfg_path = Path(args.galvatron_plan).with_suffix(".ds_config.json")
            write_json_atomic(str(cfg_path), trainer.ds_config)
    log(f"model {choice.name} ({choice.family}, {choice.task}) | world {groups.world_size} = pp {plan.pp_deg} x "
        f"tp {groups.tp} x dp {groups.dp} | ZeRO {plan.zero_stage} | chunks {plan.chunks} | micro-batch "
        f"{plan.micro_batch_size} | {plan.precision} | {plan.describe()}")

    start = args.start_step
    if args.resume:
        client_state = trainer.load_latest(args.save_dir, module_only=args.resume_weights_only)
        if client_state is None:
            log(f"--resume: no checkpoint in {args.save_dir} yet, starting from step 0")
        else:
            start = int(client_state["step"])
            log(f"resumed from {args.save_dir} at step {start}")
            if start >= args.steps:
                log(f"the checkpoint is at step {start}, --steps is {args.steps}: nothing left to train")

    if dataset is None:
        data = SyntheticData(adapter, choice.config, choice.task, plan, groups.dp_rank, args.seed, seq_len=choice.seq_len)
    else:
        data = FileData(adapter, choice.config, choice.task, plan, groups.dp_rank, args.seed, dataset,
                        seq_len=choice.seq_len, tokenize=tokenize)
    eval_data = None
    if eval_set is not None:
        from backends.data import EvalData

        eval_data = EvalData(adapter, choice.config, choice.task, plan, groups.dp_rank, args.seed, eval_set,
                             seq_len=choice.seq_len, tokenize=eval_tokenize)
    for d in (data, eval_data):
        if d is not None:
            d.share = groups.batch_share          # per-layer TP plans: this rank's fine slices
    flops = adapter.flops_per_sample(choice.config, choice.task, seq_len=choice.seq_len)
    metrics = Metrics(args.metrics_file, rank)
    records: list[dict] = []
    bar = tqdm(total=args.steps, initial=min(start, args.steps), disable=rank != 0, desc="train", dynamic_ncols=True)
    # Python's cyclic GC otherwise pauses random steps (up to +90 % on ViT-L on an H100): automatic
    # collection off (backends/gc_pause.py), a collection every GC_EVERY steps between the timed regions
    with automatic_gc_off():
        for step in range(start, args.steps):
            if step > start and (step - start) % GC_EVERY == 0:
                gc.collect()
            # inputs reach the device before the timer starts, as in the plain-HF anchor loop (a real input
            # pipeline overlaps this copy with the previous step: pinned memory, non-blocking copies)
            micro = trainer.to_device(data.micro_batches(step))
            if on_gpu:
                torch.cuda.synchronize()
            t0, cpu0 = time.perf_counter(), time.process_time()
            result = trainer.train_step(micro)
            if on_gpu:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            peaks = gather_floats(peak_memory_mb())
            rec = {"step": step, "loss": result.loss, "grad_norm": result.grad_norm, "step_time_s": dt,
                   "samples_per_s": plan.global_bsz / dt,
                   "tflops_per_gpu": flops * plan.global_bsz / dt / groups.world_size / 1e12,
                   "peak_memory_mb": max(peaks),
                   # until the host had queued the step, and the process's CPU time meanwhile (all threads:
                   # the backward runs on autograd's device thread). Both count the wait at DeepSpeed's optimizer
                   # step, which reads the gradient norm or the overflow flag back (CUDA spins while it waits), so
                   # host_s is close to step_time_s on every step
                   "host_s": result.queued_at - t0, "host_cpu_s": result.queued_cpu - cpu0,
                   # the bound, measured: until the host had queued the last backward (nothing read back so far),
                   # and until the device had finished it; equal on a launch-bound step
                   **backward_times(result, t0), "time": time.time()}
            records.append(rec)
            metrics.write(rec)
            bar.set_postfix(loss=f"{result.loss:.4f}", s_per_step=f"{dt:.3f}")
            bar.update(1)
            log(f"step {step:5d} | loss {result.loss:.6f} | grad norm {_fmt(result.grad_norm)} | {dt:.3f} s | "
                f"{rec['samples_per_s']:.1f} samples/s | {rec['tflops_per_gpu']:.3f} TFLOP/s/GPU | "
                f"peak {rec['peak_memory_mb']:.0f} MB")
            if eval_data is not None and (step + 1 == args.steps or args.eval_every and (step + 1) % args.eval_every == 0):
                run_eval(trainer, eval_data, seq.loss_fn, groups.tp_rank, step + 1, metrics, log)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save_checkpoint(args, trainer, plan, choice, step + 1, rank)
    bar.close()
    if records:
        summary = summarize(plan, groups, records, gather_floats(peak_memory_mb()), flops)
        summary["measured"]["load_peak_memory_mb"] = load_peaks
        metrics.write(summary)
        if rank == 0:
            print_summary(summary, log)
    metrics.close()
    if args.save_dir and records:
        save_checkpoint(args, trainer, plan, choice, args.steps, rank)
    if args.export_hf:
        export_hf(trainer, layout, adapter, choice, args.export_hf, rank, log)
    trainer.destroy()
    destroy_parallel_groups()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
