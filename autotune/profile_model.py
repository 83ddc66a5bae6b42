"""Model profiler: per layer type, forward / backward / recompute time against micro-batch size for
each TP shard shape, exact parameters and activation bytes; the same for embeddings and head + loss.

    python autotune/profile_model.py --model bert-large --device cuda --precision bf16 \
        --batch-sizes 1,2,4,8,16,32 --tp 1,2,4,8 --out profiles/h100/bert-large.json

How (and why this way):
  * Layers come from model_zoo (`make_layer`, `layer_inputs`, `shared_inputs` of the family's spec.py),
    so the profiler runs exactly the HF module the runtime runs. Weights are cast to the training
    precision (DeepSpeed bf16 keeps bf16 weights; no autocast).
  * TP: the layer one TP rank computes (heads/tp heads of the full head size, ffn/tp) is built on one
    device from a sharded config: the family's `tp_shard_config(config, type_index, tp)` when spec.py
    has one, else the HF config with num_attention_heads/tp, head_dim kept and the FFN width/tp. The
    result is checked against the Megatron shape (every Linear split by tp along exactly one side);
    a layer whose config cannot express its shard is skipped with a note, never profiled wrongly.
    The TP collectives are not timed here: the cost model takes them from the hardware profile.
  * Time of a layer: forward, backward, and backward of the checkpointed layer (torch.utils.checkpoint,
    non-reentrant; recompute = bwd_ckpt - bwd), per call of N back-to-back calls with one backward over
    all of them (N sized to ~REGION_MS, at most MAX_CALLS and what memory allows). On CUDA the two
    things a layer's cost inside a model is made of are measured apart (time_layer_split): the GPU time,
    between CUDA events placed after a spin kernel (torch.cuda._sleep, calibrated once) that outlasts the
    host's launches of the phase, so the GPU runs it without launch gaps; and the CPU launch time, the
    host's wall time of launching the same phase while the GPU spins. A repetition counts only if the
    spin was still running when the host was done (event query). time_ms = max(cpu, gpu) per point (the
    steady cost where CPU and GPU overlap), gpu_ms and cpu_ms stored next to it; medians of the
    repetitions, run interleaved over the batch sizes. Fit: floor = median CPU time, line through the
    GPU times (autotune/model_profile.py fit_split). On CPU: wall clock of one call, median; fit_time.
  * Activations: saved-tensor accounting (model_zoo/accounting.py) per sample, from the slope between
    two batch sizes; inputs shared by all layers (masks, position bias, encoder output) are excluded
    and charged to the embeddings instead. On GPU the allocator's increase over the forward is recorded
    next to it as a cross-check.
  * Embeddings ("first") and head + loss ("last"): model_zoo has no hook to build them alone, so they are
    measured generically inside the HF task model (AutoModelFor<task>.from_config): forward / backward
    hooks on the Transformer layers split the step into before-the-layers, layers, and after-the-layers.
    Anything between layers that no profiled layer type contains (T5's encoder norm and decoder
    embedding) and shared layer inputs (T5's encoder output) are charged to "last", as the analytic
    model_zoo description does; Swin's patch merging is part of its "*_merge" layer types.
    Vocab TP for text models: the task model is built with the padded V/vtp vocabulary. On CUDA their
    times are split as the layers' are (SpunStep: the hooks place a spin before each of the four regions
    and time GPU and CPU launch apart; the GPU catches up before the last layer's forward and the first
    layer's backward); fitted like the layers. A region no spin outlasts (the host waits for the GPU
    inside it: BERT's and T5's embeddings forward, with HF's mask preparation, on an H200) keeps its
    stream-order time, and so do all four where no spun step holds, and on CPU: times of one whole
    training step from a synchronised start, fitted by fit_time.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib
import inspect
import os
import platform
import socket
import statistics
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from autotune.model_profile import (MEASURED_KINDS, Entry, LayerTypeProfile, ModelProfile, ProfileError, fit_entry,
                                    fit_errors)
from backends.gc_pause import automatic_gc_off
from model_zoo.accounting import _storage_key as _key   # (device, storage address), as the accounting keys
from model_zoo.common import TORCH_DTYPES

FFN_KEYS = ("intermediate_size", "d_ff", "ffn_dim", "n_inner")   # HF names of the MLP width
MLM_SHARE = 0.15
# Where modules between Transformer layers that no layer type contains (T5: encoder final norm, decoder
# embedding) and inputs shared by all layers (T5: the encoder output) are charged: "last", as the
# analytic description in model_zoo/t5/spec.py does, so profile and analytic numbers add up the same way.
BETWEEN_PART = "last"


class UsageError(ValueError):
    """Bad command-line input; reported as one line with exit code 2."""


class ShardError(ValueError):
    """A layer whose TP shard cannot be built from its config."""


# ============================================================================================ options
@dataclass
class Options:
    device: torch.device
    precision: str
    batch_sizes: list[int]
    tps: list[int]
    warmup: int
    reps: int
    other_reps: int
    act_batches: tuple[int, int]
    check_batch: int
    seq_len: Any
    do_other: bool
    layer_types: list[str] | None

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.precision]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"{flag} '{text}' must be comma-separated positive integers, e.g. 1,2,4,8") from None
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag} '{text}' must be comma-separated positive integers, e.g. 1,2,4,8")
    return sorted(set(vals))


def _seq_len(text: str | None) -> Any:
    """None, one length, or (encoder, decoder) for T5."""
    if text is None:
        return None
    parts = _int_list(text, "--seq-len") if "," not in text else [int(x) for x in text.split(",") if x.strip()]
    if len(parts) > 2 or any(v < 1 for v in parts):
        raise UsageError(f"--seq-len '{text}' takes one positive length, or encoder,decoder for T5 (e.g. 512,128)")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="preset name (model_zoo/registry.py), HF config .json or checkpoint folder; "
                                    "several comma-separated (then --out is a folder)")
    p.add_argument("--task", default=None, help="task (default: the preset's / family's default)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--precision", choices=tuple(TORCH_DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--seq-len", default=None, help="tokens per sample (T5: encoder,decoder); default: preset")
    p.add_argument("--batch-sizes", default=None, help="per-rank micro-batch sizes (default GPU 1..32, CPU 1,2,4,8)")
    p.add_argument("--tp", default="1,2,4,8", help="TP degrees whose shard shapes are profiled (default 1,2,4,8)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per point (median; default GPU 10, CPU 3)")
    p.add_argument("--other-reps", type=int, default=None,
                   help="task-model steps per batch size for the embeddings and head (median; default GPU 16 or "
                        "reps / 2 if more, CPU reps / 2): their regions are short and launch-bound, so their "
                        "medians scatter more than the layers'")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (default GPU 3, CPU 1)")
    p.add_argument("--layer-types", default=None, help="only these layer type names, comma-separated")
    p.add_argument("--skip-other", action="store_true", help="do not profile embeddings and head")
    p.add_argument("--refit", metavar="PROFILE", default=None,
                   help="re-fit the raw times of an existing profile (no measuring) and write --out")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: models of a list not started within it are skipped (unattended GPU runs)")
    p.add_argument("--out", required=True, help="profile JSON to write (atomically); a folder for several models")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject bad input before any work, with the fix in the message."""
    models = model_list(args)
    if len(models) > 1:
        if not os.path.isdir(args.out):
            raise UsageError(f"several models need --out to be an existing folder (one <model>.json each); "
                             f"create {args.out} or profile one model")
    elif os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a folder; give a file name such as {args.out}/profile.json")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out folder {folder} does not exist; create it or choose another path")
    if args.refit:
        return
    if not models:
        raise UsageError("--model is required: a preset (e.g. bert-large) or an HF config/checkpoint path")
    if args.time_budget is not None and args.time_budget <= 0:
        raise UsageError(f"--time-budget {args.time_budget} must be > 0 seconds")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no GPU; run on a GPU machine or pass --device cpu")
    for flag, least in (("reps", 1), ("other_reps", 1), ("warmup", 0)):
        v = getattr(args, flag)
        if v is not None and v < least:
            raise UsageError(f"--{flag.replace('_', '-')} {v} must be >= {least}")
    if args.batch_sizes:
        _int_list(args.batch_sizes, "--batch-sizes")
    _int_list(args.tp, "--tp")
    _seq_len(args.seq_len)


def model_list(args: argparse.Namespace) -> list[str]:
    return [m for m in (args.model or "").split(",") if m]


def out_path(folder: str, model: str) -> str:
    """<folder>/<model>.json for one model of a list (a config path gives its file or folder name)."""
    name = os.path.basename(os.path.normpath(model))
    return os.path.join(folder, (name[:-5] if name.endswith(".json") else name) + ".json")


def make_options(args: argparse.Namespace) -> Options:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    precision = args.precision or ("bf16" if cuda else "fp32")
    bs = _int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes else ([1, 2, 4, 8, 16, 32] if cuda
                                                                                 else [1, 2, 4, 8])
    reps = args.reps or (10 if cuda else 3)
    return Options(device=device, precision=precision, batch_sizes=bs, tps=_int_list(args.tp, "--tp"),
                   warmup=args.warmup if args.warmup is not None else (3 if cuda else 1),
                   reps=reps, other_reps=args.other_reps or max(OTHER_REPS_CUDA if cuda else 1, reps // 2),
                   act_batches=(4, 8), check_batch=8, seq_len=_seq_len(args.seq_len), do_other=not args.skip_other,
                   layer_types=args.layer_types.split(",") if args.layer_types else None)


# ============================================================================================ timing
OTHER_REPS_CUDA = 16  # task-model steps per batch size on a GPU: the embeddings' and head's regions are short and
                      # launch-bound, and medians of 5 scattered (H200, t5-base: their fit error 6.2 % with 5,
                      # 2.5 % with 16 steps; profiles/h200/runs/s10), and they cost little next to the layers
REGION_MS = 25.0     # CUDA: back-to-back calls per timed region sized to ~this many ms of max(CPU, GPU) time:
                     # the first call after a synchronisation costs a fixed extra (H200 host: +45-63 % of a
                     # further call's launch time), so a region of N calls charges 1/N of it per call; ~8
                     # launch-bound calls here, 3-4 with the 10 ms before session 8
MAX_CALLS = 32       # at most this many calls per region (they keep their activations alive until the backward)
MEM_SHARE = 0.5      # ... and at most this share of the free device memory for the region's activations
SLEEP_MARGIN = 1.25  # the GPU spin before a timed phase lasts this times the phase's expected CPU launch time
SLEEP_PAD_MS = 0.3   # ... plus this
SETTLE_TRIES = 6     # attempts to find a spin length / region size for which the split holds (then: no split)
_CYCLES_PER_MS: dict = {}   # device index -> GPU clock cycles per ms of torch.cuda._sleep, calibrated once


def spin_ms(expected_cpu_ms: float, factor: float = 1.0) -> float:
    """How long the spin before a timed region lasts: enough for the host to launch the whole region
    (expected CPU launch ms) before the GPU gets to it, times `factor` after a spin turned out too short."""
    return factor * (SLEEP_MARGIN * expected_cpu_ms + SLEEP_PAD_MS)


class Clock:
    """Marks points in the device's stream order: CUDA events on GPU, perf_counter on CPU. On CUDA it can also
    keep the stream busy (`sleep`, a spin kernel) and tell whether the GPU has passed a mark (`reached`): what
    the split of GPU time and CPU launch time needs (`can_split`)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.can_split = self.cuda and hasattr(torch.cuda, "_sleep")

    def mark(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def sleep(self, ms: float) -> None:
        """Enqueue a spin of about `ms` on the stream (returns at once): the host runs ahead of the GPU."""
        if ms > 0:
            torch.cuda._sleep(max(1, int(ms * self.cycles_per_ms())))

    def reached(self, mark: Any) -> bool:
        """Whether the GPU has already passed `mark` (asked from the host, without waiting)."""
        return mark.query()

    def cycles_per_ms(self) -> float:
        """Spin cycles per ms, measured once per device: the shortest of 3 timings of a ~5 ms spin, so a spin
        lasts at least as long as asked unless the clock rises above the calibration's."""
        key = self.device.index if self.device.index is not None else torch.cuda.current_device()
        if key not in _CYCLES_PER_MS:
            cycles = 10_000_000
            self.sync()
            torch.cuda._sleep(1000)   # loads the kernel
            self.sync()
            best = 0.0
            for _ in range(3):
                a = self.mark()
                torch.cuda._sleep(cycles)
                b = self.mark()
                self.sync()
                best = max(best, cycles / max(self.ms(a, b), 1e-3))
            _CYCLES_PER_MS[key] = best
        return _CYCLES_PER_MS[key]


def make_clock(opts: Options) -> Clock:
    return Clock(opts.device)


def first_tensor(out: Any) -> torch.Tensor:
    """The hidden states a layer hands to the next one (HF layers return a tensor or a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output hidden states in a {type(out).__name__}")


def as_leaves(inputs: tuple) -> tuple:
    """Inputs as graph leaves with their requires_grad flag kept, so repeated backwards stay independent."""
    return tuple(x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in inputs)


def _clear_grads(module: nn.Module, inputs: tuple) -> None:
    module.zero_grad(set_to_none=True)
    for x in inputs:
        if isinstance(x, torch.Tensor):
            x.grad = None


def time_layer_once(module: nn.Module, leaves: list[tuple], grad: torch.Tensor, clock: Clock,
                    ckpt: bool) -> tuple[float, float]:
    """(forward ms, backward ms) per call of len(leaves) back-to-back calls and one backward over all of
    them; with ckpt every forward runs under activation checkpointing (non-reentrant)."""
    _clear_grads(module, [x for inputs in leaves for x in inputs])
    clock.sync()
    a = clock.mark()
    outs = [checkpoint(module, *x, use_reentrant=False) if ckpt else module(*x) for x in leaves]
    b = clock.mark()
    torch.autograd.backward([first_tensor(o) for o in outs], [grad] * len(outs))
    c = clock.mark()
    clock.sync()
    return clock.ms(a, b) / len(leaves), clock.ms(b, c) / len(leaves)


def calls_per_timing(single_ms: float, opts: Options, cap: int = MAX_CALLS) -> int:
    """Back-to-back calls per timed region on GPU: a layer inside a model is launched right after the
    previous one, so its steady cost is max(CPU launch time, GPU time); timing one call between two
    synchronisations would add the queue start-up instead. Aim for ~REGION_MS per region, at most
    min(cap, MAX_CALLS) calls. CPU: 1."""
    if not opts.cuda:
        return 1
    return max(1, min(MAX_CALLS, cap, round(REGION_MS / max(single_ms, 1e-3))))


def time_layer(module: nn.Module, inputs: tuple, opts: Options) -> dict[str, float]:
    """Median per-call fwd, bwd and bwd_ckpt ms of a layer at one batch size, each region timed as a whole
    (CUDA events from a synchronised start, or wall clock on CPU): the CPU path, and the CUDA fallback
    where GPU and CPU time cannot be told apart (see time_layer_split)."""
    clock = Clock(opts.device)
    grad = torch.randn_like(first_tensor(module(*inputs)))
    single = 0.0
    for _ in range(max(1, opts.warmup) if opts.cuda else opts.warmup):   # GPU: one at least, to size the region
        f, b = time_layer_once(module, [inputs], grad, clock, False)
        time_layer_once(module, [inputs], grad, clock, True)
        single = f + b
    leaves = [as_leaves(inputs) for _ in range(calls_per_timing(single, opts))]
    fwd, bwd, bwd_ckpt = [], [], []
    for _ in range(opts.reps):
        f, b = time_layer_once(module, leaves, grad, clock, False)
        _, bc = time_layer_once(module, leaves, grad, clock, True)
        fwd.append(f)
        bwd.append(b)
        bwd_ckpt.append(bc)
    _clear_grads(module, [t for inp in leaves for t in inp])
    return {"fwd": statistics.median(fwd), "bwd": statistics.median(bwd), "bwd_ckpt": statistics.median(bwd_ckpt),
            "calls_per_timing": len(leaves)}


# ---------------------------------------------------------------- CUDA: GPU time and CPU launch time apart
def split_region(module: nn.Module, leaves: list[tuple], grad: torch.Tensor, clock: Clock, ckpt: bool,
                 sleep_fwd_ms: float, sleep_bwd_ms: float) -> dict:
    """One region (len(leaves) back-to-back calls, one backward over all of them), each phase timed on both
    sides: the host's wall time of launching it (perf_counter, nothing waits for the GPU inside), and its GPU
    time between CUDA events that follow a spin (clock.sleep) long enough for the host to have launched the
    whole phase before the GPU gets to it, so the GPU runs it without launch gaps. `ok`: the spin was still
    running when the host had launched the phase (checked for each spun phase); only then are both numbers
    what they say. sleep_fwd_ms 0: the forward runs unspun and its GPU time is None (the checkpointed region,
    whose forward is not used). Both 0: an untimed warm-up whose "gpu" numbers are plain event times.
    Per call ms: fwd_gpu, fwd_cpu, bwd_gpu, bwd_cpu."""
    n = len(leaves)
    _clear_grads(module, [x for inputs in leaves for x in inputs])
    clock.sync()
    clock.sleep(sleep_fwd_ms)
    a = clock.mark()
    t0 = time.perf_counter()
    outs = [checkpoint(module, *x, use_reentrant=False) if ckpt else module(*x) for x in leaves]
    t1 = time.perf_counter()
    ok = sleep_fwd_ms <= 0 or not clock.reached(a)
    b = clock.mark()
    clock.sleep(sleep_bwd_ms)
    b2 = clock.mark()
    t2 = time.perf_counter()
    torch.autograd.backward([first_tensor(o) for o in outs], [grad] * n)
    t3 = time.perf_counter()
    ok = ok and (sleep_bwd_ms <= 0 or not clock.reached(b2))
    c = clock.mark()
    clock.sync()
    del outs
    return {"fwd_gpu": clock.ms(a, b) / n if sleep_fwd_ms > 0 or sleep_bwd_ms <= 0 else None,
            "fwd_cpu": (t1 - t0) * 1e3 / n, "bwd_gpu": clock.ms(b2, c) / n, "bwd_cpu": (t3 - t2) * 1e3 / n, "ok": ok}


SPLIT_KEYS = ("fwd_gpu", "fwd_cpu", "bwd_gpu", "bwd_cpu", "bwd_ckpt_gpu", "bwd_ckpt_cpu")


@dataclass
class SplitPoint:
    """One batch size under the split timing: its inputs, region size, expected CPU launch times and samples."""

    b: int
    inputs: tuple
    grad: torch.Tensor
    leaves: list[tuple]
    est_cpu: dict[str, float]          # single-call CPU launch ms of "fwd", "bwd", "bwd_ckpt" (warm-up)
    factor: float = 1.0                # spin length multiplier (doubled when a spin turned out too short)
    split: bool = True                 # False: no spin length / region size held; timed by time_layer
    rejected: int = 0                  # repetitions dropped because the spin ended before the host was done
    samples: dict = field(default_factory=lambda: {k: [] for k in SPLIT_KEYS})

    def sleep_ms(self, kind: str) -> float:
        return spin_ms(len(self.leaves) * self.est_cpu[kind], self.factor)

    def add(self, r: dict) -> None:
        """Keep a repetition's numbers; the expected CPU times become the medians measured so far."""
        for k in SPLIT_KEYS:
            self.samples[k].append(r[k])
        self.est_cpu = {k: statistics.median(self.samples[f"{k}_cpu"]) for k in MEASURED_KINDS}


def split_rep(module: nn.Module, p: SplitPoint, clock: Clock) -> dict | None:
    """One repetition at one batch size: the plain region (forward and backward spun) and the checkpointed
    one (backward spun); None when a spin ended before the host had launched its phase."""
    r = split_region(module, p.leaves, p.grad, clock, False, p.sleep_ms("fwd"), p.sleep_ms("bwd"))
    if not r["ok"]:
        return None
    rc = split_region(module, p.leaves, p.grad, clock, True, 0.0, p.sleep_ms("bwd_ckpt"))
    if not rc["ok"]:
        return None
    return {"fwd_gpu": r["fwd_gpu"], "fwd_cpu": r["fwd_cpu"], "bwd_gpu": r["bwd_gpu"], "bwd_cpu": r["bwd_cpu"],
            "bwd_ckpt_gpu": rc["bwd_gpu"], "bwd_ckpt_cpu": rc["bwd_cpu"]}


def region_cap(clock: Clock, per_call_bytes: int) -> int:
    """Calls per region the free device memory allows (MEM_SHARE of it); MAX_CALLS where unknown."""
    if not clock.cuda or per_call_bytes <= 0:
        return MAX_CALLS
    free = torch.cuda.mem_get_info(clock.device)[0]
    free += torch.cuda.memory_reserved(clock.device) - torch.cuda.memory_allocated(clock.device)
    return max(1, int(MEM_SHARE * free // per_call_bytes))


def prepare_split(module: nn.Module, inputs: tuple, b: int, opts: Options, clock: Clock) -> SplitPoint:
    """Warm-up at one batch size, then the region size and spin lengths for which the split holds: single
    calls (max(1, warmup - 1) times; the last gives the expected CPU launch times and, on CUDA, the memory a
    call takes), the sized region once unspun (its memory comes from the allocator outside the timed runs),
    then spun repetitions until one holds: spin x2 (up to x4), then half the calls (the launch queue may
    fill up while the GPU spins), at most SETTLE_TRIES times; else split=False."""
    grad = torch.randn_like(first_tensor(module(*inputs)))
    if clock.cuda:
        clock.sync()
        torch.cuda.reset_peak_memory_stats(clock.device)
        base = torch.cuda.memory_allocated(clock.device)
    for _ in range(max(1, opts.warmup - 1)):
        plain = split_region(module, [inputs], grad, clock, False, 0.0, 0.0)
        ck = split_region(module, [inputs], grad, clock, True, 0.0, 0.0)
    per_call = torch.cuda.max_memory_allocated(clock.device) - base if clock.cuda else 0
    single = max(plain["fwd_cpu"], plain["fwd_gpu"]) + max(plain["bwd_cpu"], plain["bwd_gpu"])
    n = calls_per_timing(single, opts, region_cap(clock, per_call))
    p = SplitPoint(b, inputs, grad, [as_leaves(inputs) for _ in range(n)],
                   {"fwd": plain["fwd_cpu"], "bwd": plain["bwd_cpu"], "bwd_ckpt": ck["bwd_cpu"]})
    split_region(module, p.leaves, grad, clock, False, 0.0, 0.0)
    split_region(module, p.leaves, grad, clock, True, 0.0, 0.0)
    for _ in range(SETTLE_TRIES):
        r = split_rep(module, p, clock)
        if r is not None:   # a warm-up too: only its CPU times are kept, as the expected ones
            p.est_cpu = {k: r[f"{k}_cpu"] for k in MEASURED_KINDS}
            return p
        if p.factor < 4:
            p.factor *= 2
        elif len(p.leaves) > 1:
            p.leaves = p.leaves[: len(p.leaves) // 2]
        else:
            break
    p.split = False
    return p


def time_layer_split(module: nn.Module, make: Callable[[int], tuple], opts: Options, clock: Clock,
                     progress: "Progress", label: str) -> tuple[list[int], list[dict], list[str]]:
    """CUDA: per batch size the median per-call GPU time and CPU launch time of fwd, bwd and bwd_ckpt, and
    time = max(cpu, gpu) per kind: what the layer costs in a model whose CPU launches ahead of its GPU.
    Batch sizes are prepared in order (out of memory: that one and larger are dropped), then the
    repetitions run interleaved over the batch sizes, so slow drifts of the host's speed reach every batch
    size alike instead of bending the curve. A repetition whose spin ended too early is run once more with
    a spin twice as long, then dropped (and the spins stay twice as long, up to x8); the expected CPU times
    the spins are sized from are the medians measured so far. A batch size without any split repetition is timed by time_layer
    (no split: gpu/cpu None). Returns (batch sizes, results, notes)."""
    points: list[SplitPoint] = []
    notes: list[str] = []
    for b in opts.batch_sizes:
        p = _unless_oom(lambda: prepare_split(module, make(b), b, opts, clock))
        if p is None:   # handled outside the except block, whose traceback still holds the graph
            notes.append(f"batch {b} and larger: out of memory")
            module.zero_grad(set_to_none=True)
            _free(opts)
            break
        points.append(p)
        progress.step(0, f"{label} b={b} ready")
    for rep in range(opts.reps):
        progress.step(0, f"{label} rep {rep + 1}/{opts.reps}")
        for i, p in enumerate(points):
            if not p.split:
                continue
            r = _unless_oom(lambda: split_rep(module, p, clock) or "retry")
            if r == "retry":   # once more with the spin twice as long; failing again: twice as long from now on
                factor, p.factor = p.factor, p.factor * 2
                r = _unless_oom(lambda: split_rep(module, p, clock) or "rejected")
                p.factor = min(8.0, p.factor) if r == "rejected" else factor
            if r is None:
                notes.append(f"batch {p.b} and larger: out of memory in the timed repetitions")
                del points[i:]
                module.zero_grad(set_to_none=True)
                _free(opts)
                break
            if r == "rejected":
                p.rejected += 1
                continue
            p.add(r)
    results = []
    for p in points:
        if p.split and p.samples["fwd_gpu"]:
            med = {k: statistics.median(v) for k, v in p.samples.items()}
            gpu = {k: med[f"{k}_gpu"] for k in MEASURED_KINDS}
            cpu = {k: med[f"{k}_cpu"] for k in MEASURED_KINDS}
            res = {k: max(gpu[k], cpu[k]) for k in MEASURED_KINDS}
            res.update(gpu=gpu, cpu=cpu, calls_per_timing=len(p.leaves))
        else:
            res = _unless_oom(lambda: time_layer(module, p.inputs, opts))
            if res is None:
                notes.append(f"batch {p.b} and larger: out of memory")
                break
            res.update(gpu=None, cpu=None)
            notes.append(f"batch {p.b}: GPU and CPU time could not be split (the GPU spin never outlasted the "
                         "host's launches: the layer may synchronise); timed as one region, CUDA events")
        results.append(res)
        p.leaves, p.inputs = [], ()
    points = points[:len(results)]
    rejected = {p.b: p.rejected for p in points if p.rejected}
    if rejected:
        notes.append(f"repetitions dropped (spin ended before the host had launched; batch: count): {rejected}")
    module.zero_grad(set_to_none=True)
    return [p.b for p in points], results, notes


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _unless_oom(fn: Callable[[], Any]) -> Any:
    """fn(), or None when the device ran out of memory (any other error propagates)."""
    try:
        return fn()
    except RuntimeError as e:
        if not is_oom(e):
            raise
    return None


# ============================================================================================ activations


def saved_bytes(module: nn.Module, inputs: tuple, exclude: Iterable[torch.Tensor], ckpt: bool) -> int:
    """Bytes autograd keeps for backward in one forward of `module` (model_zoo/accounting.py)."""
    from model_zoo.accounting import saved_tensor_bytes
    skip = list(exclude) + list(module.parameters()) + list(module.buffers())
    fn = (lambda *a: checkpoint(module, *a, use_reentrant=False)) if ckpt else module
    with torch.random.fork_rng(devices=[module_device(module)] if module_device(module).type == "cuda" else []):
        return saved_tensor_bytes(fn, *inputs, exclude=skip)


def module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def per_sample(b1: int, v1: int, b2: int, v2: int) -> tuple[int, int]:
    """(bytes per sample, fixed bytes) from two batch sizes: shared tables do not scale with the batch."""
    slope = (v2 - v1) / (b2 - b1)
    return int(round(slope)), int(round(v1 - slope * b1))


def allocator_check(module: nn.Module, inputs: tuple, device: torch.device) -> dict:
    """GPU cross-check at one batch size: saved-tensor bytes of storages created in the forward vs the
    allocator's increase over the forward (minus outputs that nothing saved)."""
    from model_zoo.accounting import round_up, saved_tensors
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()   # fresh segments: fewer cached blocks handed out whole (see below)
    torch.cuda.reset_peak_memory_stats(device)
    before, req_before = torch.cuda.memory_allocated(device), _requested(device)
    storages, out = saved_tensors(module, *inputs, exclude=tensors)
    torch.cuda.synchronize(device)
    after, req_after = torch.cuda.memory_allocated(device), _requested(device)
    peak = torch.cuda.max_memory_allocated(device)
    saved_new = sum(s.nbytes for s in storages)
    saved_keys = {s.key for s in storages}   # outputs of this forward that it saved (inputs: input_keys)
    input_keys = {_key(t) for t in tensors}
    outs = [out] if isinstance(out, torch.Tensor) else [o for o in (out or ()) if isinstance(o, torch.Tensor)]
    seen, unsaved_out, unsaved_rounded = set(), 0, 0
    for o in outs:
        k = _key(o)
        if k not in saved_keys and k not in input_keys and k not in seen:
            seen.add(k)
            unsaved_out += o.untyped_storage().nbytes()
            unsaved_rounded += round_up(o.untyped_storage().nbytes(), 512)   # the allocator's block rounding
    requested = req_after - req_before - unsaved_out
    alloc = after - before - unsaved_rounded
    del out
    rel = (requested - saved_new) / saved_new if saved_new else 0.0
    return {"saved_bytes": saved_new, "allocator_requested_bytes": requested, "rel_diff": rel,
            "allocator_bytes": alloc, "rel_diff_allocated": (alloc - saved_new) / saved_new if saved_new else 0.0,
            "allocator_peak_bytes": peak - before, "unsaved_output_bytes": unsaved_out,
            "method": "torch.cuda.memory_stats requested_bytes (what tensors asked for) and memory_allocated "
                      "(blocks handed out: rounded to 512 B, and a cached block is handed out whole when the "
                      "rest would be under 1 MiB) across one forward, minus outputs nothing saved"}


def _requested(device: torch.device) -> int:
    return int(torch.cuda.memory_stats(device).get("requested_bytes.all.current", 0))


# ============================================================================================ layers
@dataclass
class LayerJob:
    """One layer type at one TP degree: how to build it and its inputs."""

    type_name: str
    type_index: int
    tp: int
    config: Any
    heads: int
    ffn: int | None


def family_spec(family: str):
    """model_zoo/<family>/spec.py: make_layer, layer_inputs, shared_inputs (and optionally tp_shard_config)."""
    return importlib.import_module(f"model_zoo.{family}.spec")


def ffn_width(config: Any) -> tuple[str, int] | None:
    for k in FFN_KEYS:
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return k, v
    return None


def shard_config(spec_mod, config: Any, type_index: int, tp: int) -> Any:
    """The config whose layer is one TP rank's shard: heads/tp heads of the same size, ffn/tp."""
    if tp == 1:
        return config
    hook = getattr(spec_mod, "tp_shard_config", None)
    if hook is not None:
        return hook(config, type_index, tp)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        raise ShardError("its config has per-stage head lists, which a config copy cannot shard")
    ffn = ffn_width(config)
    if heads % tp or ffn is None or ffn[1] % tp:
        raise ShardError(f"heads {heads} or FFN width {ffn and ffn[1]} is not divisible by {tp}")
    cfg = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    cfg.num_attention_heads = heads // tp
    cfg.head_dim = head_dim
    setattr(cfg, ffn[0], ffn[1] // tp)
    return cfg


def check_megatron_shard(full: nn.Module, shard: nn.Module, tp: int) -> None:
    """Every Linear of the shard must be the full one split by tp along exactly one side (column- or
    row-parallel), as Megatron TP splits it; anything else means the config did not express the shard."""
    full_lin = {n: m for n, m in full.named_modules() if isinstance(m, nn.Linear)}
    shard_lin = {n: m for n, m in shard.named_modules() if isinstance(m, nn.Linear)}
    if full_lin.keys() != shard_lin.keys():
        raise ShardError("the shard has different Linear modules than the full layer")
    for n, f in full_lin.items():
        s = shard_lin[n]
        col = (s.out_features * tp, s.in_features) == (f.out_features, f.in_features)
        row = (s.out_features, s.in_features * tp) == (f.out_features, f.in_features)
        if not (col or row):
            raise ShardError(f"Linear '{n}' is {s.in_features}->{s.out_features} in the shard, not the full "
                             f"{f.in_features}->{f.out_features} split by {tp} on one side")


def build_layer(spec_mod, job: LayerJob, opts: Options) -> nn.Module:
    return spec_mod.make_layer(job.config, job.type_index).to(device=opts.device, dtype=opts.dtype).train()


def make_inputs(spec_mod, job: LayerJob, batch: int, opts: Options) -> tuple:
    kw = {"seq_len": opts.seq_len} if "seq_len" in inspect.signature(spec_mod.layer_inputs).parameters else {}
    return as_leaves(spec_mod.layer_inputs(job.config, job.type_index, batch, opts.device, opts.dtype, **kw))


def shared_of(spec_mod, job: LayerJob, inputs: tuple, ckpt: bool = False) -> tuple:
    """Inputs not charged to the layer: those all layers share, and with checkpointing also those the
    runtime's layer builds itself (spec `rebuilt_inputs`: a checkpoint never keeps them)."""
    fn = getattr(spec_mod, "shared_inputs", None)
    if fn is None:  # the documented convention: input 0 is the layer's own hidden state
        shared = tuple(x for x in inputs[1:] if isinstance(x, torch.Tensor))
    else:
        shared = tuple(fn(job.config, job.type_index, inputs))
    rebuilt = getattr(spec_mod, "rebuilt_inputs", None)
    return shared + (tuple(rebuilt(job.config, job.type_index, inputs)) if ckpt and rebuilt else ())


def profile_layer(spec_mod, job: LayerJob, opts: Options, progress: "Progress") -> dict:
    """Times at every batch size, activation bytes, parameters (and the GPU allocator check)."""
    layer = build_layer(spec_mod, job, opts)
    params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    clock = make_clock(opts)
    if clock.can_split:   # CUDA: GPU time and CPU launch time apart, repetitions interleaved over batch sizes
        done, results, notes = time_layer_split(layer, lambda b: make_inputs(spec_mod, job, b, opts), opts, clock,
                                                progress, f"{job.type_name} tp={job.tp}")
        progress.step(len(opts.batch_sizes), f"{job.type_name} tp={job.tp}")
    else:
        done, results, notes = [], [], []
        for b in opts.batch_sizes:
            t = _unless_oom(lambda: time_layer(layer, make_inputs(spec_mod, job, b, opts), opts))
            if t is None:   # handled outside the except block, whose traceback still holds the graph
                notes.append(f"batch {b} and larger: out of memory")
                layer.zero_grad(set_to_none=True)
                _free(opts)
                progress.step(len(opts.batch_sizes) - len(done))
                break
            results.append(t)
            done.append(b)
            progress.step(1, f"{job.type_name} tp={job.tp} b={b}")
    times = {k: [t[k] for t in results] for k in MEASURED_KINDS}
    entry: dict = {"heads": job.heads, "ffn_hidden": job.ffn, "params": params, "batch_sizes": done,
                   "time_ms": times, "calls_per_timing": [t["calls_per_timing"] for t in results]}
    gpu_ms = cpu_ms = None
    if clock.can_split:   # same shape as time_ms; None where a batch size could not be split
        gpu_ms = {k: [t["gpu"][k] if t["gpu"] else None for t in results] for k in MEASURED_KINDS}
        cpu_ms = {k: [t["cpu"][k] if t["cpu"] else None for t in results] for k in MEASURED_KINDS}
        entry.update(gpu_ms=gpu_ms, cpu_ms=cpu_ms)
    entry["fits"] = {k: f.to_dict() for k, f in fit_entry(done, times, gpu_ms, cpu_ms).items()}
    act, ckpt = {}, {}
    for b in opts.act_batches:
        x = make_inputs(spec_mod, job, b, opts)
        act[b] = saved_bytes(layer, x, shared_of(spec_mod, job, x), ckpt=False)
        ckpt[b] = saved_bytes(layer, x, shared_of(spec_mod, job, x, ckpt=True), ckpt=True)
    b1, b2 = opts.act_batches
    entry["act_bytes"], entry["act_fixed_bytes"] = per_sample(b1, act[b1], b2, act[b2])
    entry["ckpt_bytes"], _ = per_sample(b1, ckpt[b1], b2, ckpt[b2])
    entry["act_measured"] = {"method": "model_zoo/accounting.py saved_tensor_bytes, slope between batch sizes "
                                       f"{b1} and {b2}; shared inputs excluded", "bytes": {str(k): v for k, v in act.items()}}
    if opts.cuda:
        x = make_inputs(spec_mod, job, opts.check_batch, opts)
        entry["act_check"] = {"batch": opts.check_batch, **allocator_check(layer, x, opts.device)}
    if notes:
        entry["notes"] = notes
    del layer
    _free(opts)
    return entry


def _free(opts: Options) -> None:
    import gc
    gc.collect()   # HF modules can sit in reference cycles; free them before emptying the cache
    if opts.cuda:
        torch.cuda.synchronize(opts.device)
        torch.cuda.empty_cache()


# ============================================================================================ other modules
def task_model_class(task: str):
    """HF Auto class of a task (task names as model_zoo/registry.py defines them)."""
    import transformers as tf
    classes = {"mlm": tf.AutoModelForMaskedLM, "text-classification": tf.AutoModelForSequenceClassification,
               "seq2seq": tf.AutoModelForSeq2SeqLM, "image-classification": tf.AutoModelForImageClassification}
    if task not in classes:
        raise ProfileError(f"task '{task}' has no HF task model here; use --skip-other or one of {', '.join(classes)}")
    return classes[task]


def task_batch(config: Any, task: str, seq_lens: tuple[int, ...], b: int, device: torch.device,
               dtype: torch.dtype, vocab: int) -> dict:
    """A random batch for the HF task model (MLM labels on 15 % of the tokens, as the runtime masks). Text
    batches have no padding and come without an attention mask: HF's mask preparation would read back from
    the GPU whether an all-ones mask masks anything (a host synchronisation inside the embeddings' and the
    encoder-to-decoder regions, which the runtime does not have: model_zoo.common.answer_on_host), and then
    builds no mask, as it does for None."""
    g = torch.Generator().manual_seed(1234 + b)
    if task == "image-classification":
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        px = torch.randn(b, config.num_channels, size, size, generator=g)
        return {"pixel_values": px.to(device=device, dtype=dtype),
                "labels": torch.randint(0, max(1, config.num_labels), (b,), generator=g).to(device)}
    S = seq_lens[0]
    ids = torch.randint(0, vocab, (b, S), generator=g)
    batch = {"input_ids": ids}
    if task == "mlm":
        keep = torch.rand(b, S, generator=g).argsort(1)[:, : max(1, round(MLM_SHARE * S))]
        picked = torch.zeros(b, S, dtype=torch.bool).scatter_(1, keep, True)
        batch["labels"] = ids.masked_fill(~picked, -100)
    elif task == "seq2seq":
        batch["labels"] = torch.randint(0, vocab, (b, seq_lens[1]), generator=g)
    else:
        batch["labels"] = torch.randint(0, max(1, config.num_labels), (b,), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


class Marks:
    """Time marks in stream order. Tensor hooks reference only this (no tensor, no module), so a graph
    that never runs backward (an activation count, an out-of-memory step) is freed with its outputs."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.items: list[tuple[str, Any]] = []

    def add(self, label: str) -> None:
        self.items.append((label, self.clock.mark(), time.perf_counter()))


BOUNDARY = ("first_fwd", "last_fwd", "last_bwd", "first_bwd")   # the embeddings' and head's regions of a step


class SpunStep:
    """The embeddings and head + loss of one task-model step timed as the layers are (split_region): before
    each spun region (those in spin_ms, ms by region) a spin that outlasts the host's launch of it, then its
    GPU time between CUDA events and its CPU launch time by the host clock. `held[region]`: the spin was
    still running when the host had launched the region (a region with a host synchronisation inside never
    holds). Regions not in spin_ms keep their stream-order time only. References only the clock (tensor
    hooks hold it, see Marks)."""

    def __init__(self, clock: Clock, spin_ms: dict[str, float]):
        self.clock, self.spin_ms = clock, spin_ms
        self.held: dict[str, bool] = {}
        self.start: dict[str, tuple] = {}
        self.end: dict[str, tuple] = {}

    def open(self, region: str) -> None:
        if region in self.spin_ms:
            self.clock.sleep(self.spin_ms[region])
            self.start[region] = (self.clock.mark(), time.perf_counter())

    def close(self, region: str) -> None:
        if region in self.spin_ms:
            self.end[region] = (self.clock.mark(), time.perf_counter())
            self.held[region] = not self.clock.reached(self.start[region][0])

    @property
    def ok(self) -> bool:
        return all(self.held.get(r, False) for r in self.spin_ms)

    def times(self) -> dict[str, float]:
        """{region}_gpu and {region}_cpu in ms of the spun regions."""
        out = {}
        for r in self.spin_ms:
            (a, host_a), (b, host_b) = self.start[r], self.end[r]
            out[f"{r}_gpu"], out[f"{r}_cpu"] = self.clock.ms(a, b), (host_b - host_a) * 1e3
        return out


@dataclass
class RegionState:
    """Where the forward is (first | layer | between | last) and the storages layers take as shared inputs."""

    region: str = "first"
    shared_keys: set = field(default_factory=set)


class LayerHooks:
    """Hooks on every Transformer layer: forward pre/post hooks mark where each layer starts and ends;
    gradient hooks on each layer's input and output hidden states mark its backward (the output's
    gradient is ready: backward starts; the input's is ready: it ends). They also tell which saved
    storage belongs to which region (first = before the layers, between, last = after). With `spun` set
    (a SpunStep) they close the embeddings' forward at the first layer, open the head's at the end of the
    last one, close the head's backward where the last layer's starts and open the embeddings' where the
    first layer's ends; and the GPU catches up (a synchronisation) before the last layer's forward and the
    first layer's backward, so the launches timed next never wait for room in a full launch queue (GPU-bound
    layers leave the host thousands of kernels ahead) and are not the first after a synchronisation."""

    def __init__(self, layers: list[nn.Module], clock: Clock):
        self.layers, self.clock = layers, clock
        self.state = RegionState()
        self.shared_refs: list[torch.Tensor] = []
        self.pres = self.posts = 0
        self.track_backward = True
        self.spun: SpunStep | None = None
        self._marks = Marks(clock)
        self.handles = []
        for m in layers:
            self.handles += [m.register_forward_pre_hook(self._pre, with_kwargs=True),
                             m.register_forward_hook(self._post)]

    @property
    def marks(self) -> list[tuple[str, Any]]:
        return self._marks.items

    def _pre(self, module, args, kwargs):
        self._marks.add("pre")
        index, spun, clock = self.pres, self.spun, self.clock
        self.pres += 1
        if spun is not None:
            if index == 0:
                spun.close("first_fwd")
            if index == len(self.layers) - 1:
                clock.sync()
        rest = [a for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        hidden = args[0] if args else (rest.pop(0) if rest else None)   # keywords only: hidden comes first
        self.state.shared_keys |= {_key(t) for t in rest}
        self.shared_refs += rest   # alive until reset, so no later tensor can reuse a recorded address
        self.state.region = "layer"
        if self.track_backward and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            marks = self._marks

            def bpost(grad):
                marks.add("bpost")
                if spun is not None and index == 1:
                    clock.sync()
                if spun is not None and index == 0:
                    spun.open("first_bwd")
            hidden.register_hook(bpost)

    def _post(self, module, args, out):
        self._marks.add("post")
        self.posts += 1
        last, spun = self.posts == len(self.layers), self.spun
        self.state.region = "last" if last else "between"
        if spun is not None and last:
            spun.open("last_fwd")
        hidden = first_tensor(out)
        if self.track_backward and hidden.requires_grad:
            marks = self._marks

            def bpre(grad):
                marks.add("bpre")
                if spun is not None and last:
                    spun.close("last_bwd")
            hidden.register_hook(bpre)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def reset(self, track_backward: bool = True, spun: SpunStep | None = None) -> None:
        self.state, self.shared_refs, self.pres, self.posts = RegionState(), [], 0, 0
        self.track_backward, self.spun = track_backward, spun
        self._marks = Marks(self.clock)


def split_times(marks: list[tuple[str, Any, float]], start: tuple, fwd_end: tuple, bwd_end: tuple,
                clock: Clock) -> dict:
    """first/last forward and backward ms from the layer marks (stream order: the GPU's time where it was
    ahead of the host, else the host's), the same by the host clock ({region}_cpu: what spins are sized
    from), and the time between layers on its own. start, fwd_end, bwd_end: (mark, host time)."""
    def of(kind: str) -> list[tuple]:
        return [(m, host) for k, m, host in marks if k == kind]

    pre, post, bpre, bpost = of("pre"), of("post"), of("bpre"), of("bpost")
    f_layers = sum(clock.ms(a[0], b[0]) for a, b in zip(pre, post))
    f_between = clock.ms(pre[0][0], post[-1][0]) - f_layers
    b_layers = sum(clock.ms(a[0], b[0]) for a, b in zip(bpre, bpost))
    b_between = clock.ms(bpre[0][0], bpost[-1][0]) - b_layers
    out = {"between_fwd": f_between, "between_bwd": b_between, "layers_fwd": f_layers, "layers_bwd": b_layers}
    for region, a, b in (("first_fwd", start, pre[0]), ("last_fwd", post[-1], fwd_end),
                         ("last_bwd", fwd_end, bpre[0]), ("first_bwd", bpost[-1], bwd_end)):
        out[region], out[f"{region}_cpu"] = clock.ms(a[0], b[0]), (b[1] - a[1]) * 1e3
    return out


@dataclass
class OtherContext:
    model: nn.Module
    layers: list[nn.Module]
    task: str
    seq_lens: tuple[int, ...]
    vocab: int
    between_is_other: bool = True   # False when the profiled layer types already include what sits between layers


def find_layers(model: nn.Module, layer_classes: set[type], expected: int) -> list[nn.Module]:
    """The model's Transformer layers: modules of the classes make_layer builds, in model order."""
    found = [m for m in model.modules() if type(m) in layer_classes]
    if len(found) != expected:
        raise ProfileError(f"found {len(found)} layers of {sorted(c.__name__ for c in layer_classes)} in the HF task "
                           f"model, expected {expected}; profile with --skip-other")
    return found


def other_step(ctx: OtherContext, b: int, opts: Options, hooks: LayerHooks, spin_ms: dict | None = None) -> dict:
    """One timed training step of the task model, split into first / layers / last. With spin_ms (ms by
    BOUNDARY region; regions left out are not spun) the embeddings and head are timed as the layers are
    (SpunStep): {region}_gpu and {region}_cpu of the spun regions, "held" by region and "ok" whether every
    spin held."""
    clock = hooks.clock
    batch = task_batch(ctx.model.config, ctx.task, ctx.seq_lens, b, opts.device, opts.dtype, ctx.vocab)
    ctx.model.zero_grad(set_to_none=True)
    spun = SpunStep(clock, spin_ms) if spin_ms else None
    hooks.reset(spun=spun)
    clock.sync()
    if spun:
        spun.open("first_fwd")
    start = (clock.mark(), time.perf_counter())
    loss = ctx.model(**batch).loss
    if spun:
        spun.close("last_fwd")
    fwd_end = (clock.mark(), time.perf_counter())
    if spun:
        spun.open("last_bwd")
    loss.backward()
    if spun:
        spun.close("first_bwd")
    bwd_end = (clock.mark(), time.perf_counter())
    clock.sync()
    t = split_times(hooks.marks, start, fwd_end, bwd_end, clock)
    hooks.reset()
    if spun:
        t.update(spun.times(), ok=spun.ok, held=dict(spun.held))
    part = BETWEEN_PART if ctx.between_is_other else "layers"
    for kind in ("fwd", "bwd"):
        t[f"{part}_{kind}"] += t[f"between_{kind}"]
        if f"{part}_{kind}_gpu" in t:     # between the layers: not split, counted in both parts
            t[f"{part}_{kind}_gpu"] += t[f"between_{kind}"]
            t[f"{part}_{kind}_cpu"] += t[f"between_{kind}"]
    return t


MAX_SPIN_FACTOR = 8.0   # a task-model region whose spin runs out even this many times longer is not spun


def spin_plan(est_cpu: dict[str, float], factor: dict[str, float]) -> dict[str, float]:
    """Spin ms per spun region (those in factor) from the expected CPU launch times."""
    return {r: spin_ms(est_cpu[r], f) for r, f in factor.items()}


def unspinnable_regions(ctx: OtherContext, b: int, opts: Options, hooks: LayerHooks, est_cpu: dict) -> set[str]:
    """The BOUNDARY regions that no spin outlasts, found once per task model with steps at batch b: a region
    whose spin ran out is spun twice as long in the next step, and given up once it ran out at
    MAX_SPIN_FACTOR. Such a region makes the host wait for the GPU inside it (a synchronisation: HF's mask
    preparation reads back whether the attention mask masks anything), so the GPU catches up whatever the
    spin; it is timed in stream order, the other regions stay split."""
    factor, dropped = {r: 1.0 for r in BOUNDARY}, set()
    while factor:
        t = other_step(ctx, b, opts, hooks, spin_plan(est_cpu, factor))
        failed = [r for r in factor if not t["held"][r]]
        for r in failed:
            if factor[r] >= MAX_SPIN_FACTOR:
                dropped.add(r)
                del factor[r]
            else:
                factor[r] *= 2
        if not any(r in factor for r in failed):   # the rest held in this step
            break
    return dropped


def spun_other_steps(ctx: OtherContext, b: int, opts: Options, hooks: LayerHooks, est_cpu: dict,
                     unspun: set[str]) -> list[dict]:
    """opts.other_reps split steps at batch b, spinning the regions not in `unspun` with spins sized from
    the expected CPU launch times (ms by BOUNDARY region, from an unspun step): a step whose spins did not
    all hold is run once more with the failed regions' spins twice as long (and they stay so, up to
    MAX_SPIN_FACTOR), then dropped. The steps that held."""
    factor, held = {r: 1.0 for r in BOUNDARY if r not in unspun}, []
    if not factor:
        return []
    for _ in range(opts.other_reps):
        for _attempt in range(2):
            t = other_step(ctx, b, opts, hooks, spin_plan(est_cpu, factor))
            if t["ok"]:
                held.append(t)
                break
            for r in factor:
                if not t["held"][r]:
                    factor[r] = min(MAX_SPIN_FACTOR, 2 * factor[r])
    return held


def other_act(ctx: OtherContext, b: int, opts: Options, hooks: LayerHooks) -> dict[str, int]:
    """Saved bytes per region (first / layers / last) in one forward, each storage counted once where
    it is first saved; storages a layer saves from its shared inputs count for "first"."""
    params = {_key(t) for t in list(ctx.model.parameters()) + list(ctx.model.buffers())}
    batch = task_batch(ctx.model.config, ctx.task, ctx.seq_lens, b, opts.device, opts.dtype, ctx.vocab)
    found: dict[tuple, tuple[str, int]] = {}
    keep: list[torch.Tensor] = []   # a freed storage's address could be reused and then missed
    hooks.reset(track_backward=False)
    state = hooks.state   # the graph keeps `pack` alive: it may reference no module and no graph tensor

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = _key(t)
        if k not in params and k not in found:
            keep.append(t)
            region = state.region
            if region == "layer" and k in state.shared_keys:
                region = "between"   # a layer saving an input all layers share (T5's encoder output)
            found[k] = (region, t.untyped_storage().nbytes())
        return t.detach()   # not t itself: see model_zoo/accounting.py saved_tensors

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ctx.model(**batch).loss
    del loss
    keep.clear()
    hooks.reset()
    out = {"first": 0, "layer": 0, "last": 0, "between": 0}
    for region, n in found.values():
        out[region] += n
    out[BETWEEN_PART if ctx.between_is_other else "layer"] += out.pop("between")
    return out


def profile_other(spec, config: Any, spec_mod, opts: Options, vtps: list[int], progress: "Progress",
                  layer_act_total: int | None) -> tuple[dict, list[str]]:
    """Embeddings and head + loss at every vtp (text models) from the HF task model with layer hooks."""
    from model_zoo.base import pad_vocab
    classes = {type(spec_mod.make_layer(config, i)) for i in range(len(spec.layer_types))}
    vocab = int(getattr(config, "vocab_size", 0) or 0) if spec.other.vocab_size else 0
    result: dict = {"first": {}, "last": {}}
    notes: list[str] = []
    for vtp in (vtps if vocab else [1]):
        ctx = build_task_model(spec, config, opts, classes, pad_vocab(vocab, vtp) // vtp if vocab else 0)
        hooks = LayerHooks(ctx.layers, make_clock(opts))
        try:
            per_part = _other_times(ctx, opts, hooks, progress, vtp, notes)
            b1, b2 = opts.act_batches
            a1, a2 = other_act(ctx, b1, opts, hooks), other_act(ctx, b2, opts, hooks)
            for part in ("first", "last"):
                e = per_part[part]
                e["act_bytes"], e["act_fixed_bytes"] = per_sample(b1, a1[part], b2, a2[part])
                e["act_measured"] = {"method": "saved storages per region of one task-model forward, slope between "
                                               f"batch sizes {b1} and {b2}", "bytes": {str(b1): a1[part], str(b2): a2[part]}}
                result[part][vtp] = e
            in_model_layers = per_sample(b1, a1["layer"], b2, a2["layer"])[0]
            result["first"][vtp]["in_model_layer_act_bytes"] = in_model_layers
            if layer_act_total and vtp == 1:
                notes.append(f"layers inside the HF task model keep {in_model_layers} B/sample; the isolated layers "
                             f"sum to {layer_act_total} B/sample ({(in_model_layers - layer_act_total) / layer_act_total:+.2%})")
        finally:
            hooks.remove()
            del ctx, hooks
            _free(opts)
    return result, notes


def build_task_model(spec, config: Any, opts: Options, classes: set[type], vocab: int) -> OtherContext:
    """The HF task model at the profiled precision; for text models with the vocabulary one vtp rank holds
    (padded V / vtp rows: the shape of a vocab-parallel embedding and LM head shard)."""
    cfg = copy.deepcopy(config)
    if vocab:
        cfg.vocab_size = vocab
    with torch.device(opts.device):
        model = task_model_class(spec.task).from_config(cfg)
    model = model.to(device=opts.device, dtype=opts.dtype).train()
    present = {type(m) for m in model.modules()}
    return OtherContext(model, find_layers(model, classes & present, spec.num_layers), spec.task, tuple(spec.seq_lens),
                        vocab, between_is_other=classes <= present)


def _other_times(ctx: OtherContext, opts: Options, hooks: LayerHooks, progress: "Progress", vtp: int,
                 notes: list[str]) -> dict:
    """Per batch size, medians over opts.other_reps task-model steps: the embeddings' and head's times, on CUDA
    split into GPU time and CPU launch time as the layers' are (spun_other_steps; time = max of the two,
    gpu_ms/cpu_ms stored, fit_split), else (CPU, a region no spin outlasts, or no split step held: noted)
    the stream-order times of whole steps; and the layers' and between-layer times inside the model (a
    check of the isolated ones)."""
    points: dict[str, list[float]] = {k: [] for k in (*BOUNDARY, "between_fwd", "between_bwd", "layers_fwd",
                                                      "layers_bwd")}
    parts: dict[str, list[float | None]] = {f"{r}_{side}": [] for r in BOUNDARY for side in ("gpu", "cpu")}
    done, unsplit = [], []
    unspun: set[str] | None = None   # regions no spin outlasts: found at the first batch size
    for b in opts.batch_sizes:
        def steps() -> list[dict]:
            nonlocal unspun
            for _ in range(max(1, opts.warmup - 1)):
                warm = other_step(ctx, b, opts, hooks)
            if hooks.clock.can_split:
                est = {r: warm[f"{r}_cpu"] for r in BOUNDARY}
                if unspun is None:
                    unspun = unspinnable_regions(ctx, b, opts, hooks, est)
                held = spun_other_steps(ctx, b, opts, hooks, est, unspun)
                if held:
                    return held
                if len(unspun) < len(BOUNDARY):
                    unsplit.append(b)
            return [other_step(ctx, b, opts, hooks) for _ in range(opts.other_reps)]

        runs = _unless_oom(steps)
        if runs is None:
            notes.append(f"other modules (vtp={vtp}): batch {b} and larger out of memory in the whole task model")
            ctx.model.zero_grad(set_to_none=True)
            _free(opts)
            progress.step(len(opts.batch_sizes) - len(done))
            break
        for r in BOUNDARY:
            split = all(f"{r}_gpu" in run for run in runs)
            for side in ("gpu", "cpu"):
                parts[f"{r}_{side}"].append(statistics.median(run[f"{r}_{side}"] for run in runs) if split else None)
            points[r].append(max(parts[f"{r}_gpu"][-1], parts[f"{r}_cpu"][-1]) if split
                             else statistics.median(run[r] for run in runs))
        for k in points:
            if k not in BOUNDARY:
                points[k].append(statistics.median(run[k] for run in runs))
        done.append(b)
        progress.step(1, f"other vtp={vtp} b={b}")
    if not done:
        raise ProfileError(f"the whole task model does not fit in memory at batch {opts.batch_sizes[0]} (vtp={vtp}); "
                           "use smaller --batch-sizes or --skip-other")
    if unspun:
        notes.append(f"other modules (vtp={vtp}): {', '.join(r for r in BOUNDARY if r in unspun)} not split into GPU "
                     f"and CPU time: the spin before it ran out even at x{MAX_SPIN_FACTOR:g} (the host waits for the "
                     "GPU inside it); stream-order times of steps without that spin")
    if unsplit:
        notes.append(f"other modules (vtp={vtp}): batch {unsplit}: GPU and CPU time could not be split (no spun "
                     "step held); timed as whole steps")
    out = {}
    for part in ("first", "last"):
        times = {"fwd": points[f"{part}_fwd"], "bwd": points[f"{part}_bwd"]}
        e: dict = {"batch_sizes": done, "time_ms": times}
        kinds = [k for k in ("fwd", "bwd") if any(x is not None for x in parts[f"{part}_{k}_gpu"])]
        gpu, cpu = ({k: parts[f"{part}_{k}_{side}"] for k in kinds} for side in ("gpu", "cpu"))
        if kinds:
            e.update(gpu_ms=gpu, cpu_ms=cpu)
        e["fits"] = {k: f.to_dict() for k, f in fit_entry(done, times, gpu, cpu).items()}
        if part == "first":   # all layers as they run inside the task model: a check of the isolated timings
            e["in_model_layers_ms"] = {"fwd": points["layers_fwd"], "bwd": points["layers_bwd"]}
        if part == BETWEEN_PART:
            e["between_layers_ms"] = {"fwd": points["between_fwd"], "bwd": points["between_bwd"],
                                      "included": ctx.between_is_other}
        out[part] = e
    return out


# ============================================================================================ driver
class Progress:
    """tqdm bar over all (layer type, tp, batch size) and (vtp, batch size) points."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, unit="pt", file=sys.stderr)

    def step(self, n: int = 1, what: str = "") -> None:
        if what:
            self.bar.set_postfix_str(what)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def layer_jobs(spec, config: Any, spec_mod, opts: Options, notes: list[str]) -> list[LayerJob]:
    """Every (layer type, TP degree) to profile; TP shards that cannot be built are skipped with a note."""
    jobs = []
    for i, lt in enumerate(spec.layer_types):
        if opts.layer_types and lt.name not in opts.layer_types:
            continue
        full = spec_mod.make_layer(config, i)
        for tp in opts.tps:
            if not lt.tp_ok(tp):
                notes.append(f"{lt.name}: tp={tp} skipped (heads {lt.heads} or FFN {lt.ffn_hidden} not divisible)")
                continue
            try:
                cfg = shard_config(spec_mod, config, i, tp)
                if tp > 1:
                    check_megatron_shard(full, spec_mod.make_layer(cfg, i), tp)
            except ShardError as e:
                notes.append(f"{lt.name}: tp={tp} not profiled: {e}; model_zoo/{spec.family}/spec.py can add "
                             f"tp_shard_config(config, type_index, tp) to build the shard")
                continue
            jobs.append(LayerJob(lt.name, i, tp, cfg, lt.heads // tp, lt.ffn_hidden // tp if lt.ffn_hidden else None))
    return jobs


def command_line() -> str:
    return " ".join(["python", "autotune/profile_model.py"] + sys.argv[1:])


def source_info(opts: Options, seconds: float) -> dict:
    import transformers
    return {"command": command_line(),
            "date": _dt.date.today().isoformat(), "host": socket.gethostname(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "seconds": round(seconds, 1),
            "timing": (("layers: GPU time (CUDA events after a spin that outlasts the host's launches) and CPU "
                        "launch time (wall clock while the GPU spins) per call of back-to-back calls, time = "
                        "max(cpu, gpu), repetitions interleaved over batch sizes; task model: CUDA events; "
                        "automatic Python GC off as in train.py")
                       if make_clock(opts).can_split else "CUDA events" if opts.cuda else "wall clock")
                      + f", {opts.warmup} warm-up, median of {opts.reps} (layers) / {opts.other_reps} (task model) "
                        "repetitions"}


def device_name(opts: Options) -> str:
    if opts.cuda:
        return torch.cuda.get_device_name(opts.device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def pooled_fit_error(profile: ModelProfile) -> float:
    """Median relative error over every fitted point of every time fit."""
    return fit_errors(profile)["all"]


def refit(profile: ModelProfile) -> ModelProfile:
    """Re-fit every entry from its raw times (after a change of the fit, without measuring again)."""
    for e in profile.layer_entries() + profile.other_entries():
        bs = e.raw.get("batch_sizes", [])
        e.fits = fit_entry(bs, e.raw.get("time_ms", {}), e.raw.get("gpu_ms"), e.raw.get("cpu_ms"))
    profile.fit_error = pooled_fit_error(profile)
    profile.source["refit"] = (f"{_dt.date.today().isoformat()}: fits recomputed from the raw times by "
                               f"`{command_line()}`")
    return profile


def layer_seq_len(model: str, given: Any) -> Any:
    """The sequence length layer_inputs must use: as get_model_spec resolves it (given, else the preset's)."""
    from model_zoo.registry import PRESETS
    if given is not None or model not in PRESETS:
        return given
    return PRESETS[model].seq_len


def run(args: argparse.Namespace) -> ModelProfile:
    from model_zoo.registry import get_model_spec, load_hf_config
    t0 = time.time()
    opts = make_options(args)
    torch.manual_seed(0)
    if not opts.cuda:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    try:  # bad model names, tasks and sequence lengths are the user's to fix: one line, exit code 2
        config = load_hf_config(args.model)
        spec = get_model_spec(args.model, opts.precision, opts.seq_len, args.task, device=opts.device.type)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    spec_mod = family_spec(spec.family)
    opts.seq_len = layer_seq_len(args.model, opts.seq_len)
    notes: list[str] = []
    jobs = layer_jobs(spec, config, spec_mod, opts, notes)
    vtps = opts.tps if spec.other.vocab_size else [1]
    total = len(jobs) * len(opts.batch_sizes) + (len(vtps) * len(opts.batch_sizes) if opts.do_other else 0)
    layer_types: dict[str, LayerTypeProfile] = {}
    # timed as train.py trains: automatic GC off (collections in _free, between layers)
    with closing(Progress(total, f"profile {args.model}")) as progress, automatic_gc_off():
        for job in jobs:
            lt = spec.layer_types[job.type_index]
            ltp = layer_types.setdefault(lt.name, LayerTypeProfile(lt.name, job.type_index, lt.count, None))
            e = profile_layer(spec_mod, job, opts, progress)
            ltp.tp[job.tp] = Entry.from_dict(e, f"{lt.name} tp={job.tp}")
            if job.tp == 1:
                ltp.params = e["params"]
        other: dict = {}
        if opts.do_other:
            total_act = None
            if all(1 in layer_types.get(lt.name, LayerTypeProfile("", 0, 0, None)).tp for lt in spec.layer_types):
                total_act = sum(layer_types[spec.layer(i).name].tp[1].act_bytes or 0 for i in range(spec.num_layers))
            raw, other_notes = profile_other(spec, config, spec_mod, opts, vtps, progress, total_act)
            notes += other_notes
            other = {p: {v: Entry.from_dict(e, f"other.{p}.vtp.{v}") for v, e in d.items()} for p, d in raw.items()}
            notes.append("embeddings/head measured inside the HF task model with layer hooks (model_zoo has no hook "
                         f"to build them alone); modules between layers (T5's encoder norm + decoder embedding) and "
                         f"saved inputs shared by all layers (T5's encoder output) are charged to '{BETWEEN_PART}' "
                         "unless a profiled layer type contains them (Swin's patch merging: its *_merge types)")
    profile = ModelProfile(model=str(args.model), family=spec.family, task=spec.task, precision=opts.precision,
                           device=device_name(opts), device_type=opts.device.type, seq_len=spec.seq_lens[0] if spec.seq_lens else None,
                           seq_lens=list(spec.seq_lens), batch_sizes=opts.batch_sizes, fit_error=0.0,
                           source=source_info(opts, time.time() - t0), layer_types=layer_types, other=other,
                           vocab_size=int(spec.other.vocab_size), notes=notes)
    profile.fit_error = pooled_fit_error(profile)
    profile.notes += layer_time_check(profile, spec)
    return profile


def layer_time_check(p: ModelProfile, spec) -> list[str]:
    """Sum of the isolated tp=1 layer fits over the model's layers vs the layers timed inside the task model."""
    first = p.other.get("first", {}).get(1)
    if first is None or not all(1 in p.layer_types.get(lt.name, LayerTypeProfile("", 0, 0, None)).tp
                                for lt in spec.layer_types):
        return []
    out = []
    bs = first.raw.get("batch_sizes", [])
    for kind in ("fwd", "bwd"):
        pairs = []
        for b, t in zip(bs, first.raw["in_model_layers_ms"][kind]):
            iso = sum(p.layer_time_ms(spec.layer(i).name, 1, b, kind) for i in range(spec.num_layers))
            pairs.append(f"b={b}: {iso:.2f} vs {t:.2f} ms ({(iso - t) / t:+.1%})")
        out.append(f"{kind} of all layers, isolated-layer fits vs timed inside the task model: " + "; ".join(pairs))
    return out


def summary(p: ModelProfile) -> str:
    lines = [f"{p.model} ({p.precision}, {p.device}): median fit error {p.fit_error:.2%}"]
    for name, lt in p.layer_types.items():
        for tp, e in sorted(lt.tp.items()):
            b = 8
            lines.append(f"  {name} tp={tp}: fwd {e.time_ms(b, 'fwd'):.3f} bwd {e.time_ms(b, 'bwd'):.3f} "
                         f"recompute {e.time_ms(b, 'recompute'):.3f} ms at b={b}; act {e.act_bytes} B/sample, "
                         f"ckpt {e.ckpt_bytes} B/sample" +
                         (f"; allocator check {e.raw['act_check']['rel_diff']:+.2%}" if "act_check" in e.raw else ""))
    for part, per in p.other.items():
        for v, e in sorted(per.items()):
            lines.append(f"  other {part} vtp={v}: fwd {e.time_ms(8, 'fwd'):.3f} bwd {e.time_ms(8, 'bwd'):.3f} ms at "
                         f"b=8; act {e.act_bytes} B/sample")
    return "\n".join(lines)


def profile_one(args: argparse.Namespace, model: str, out: str) -> int:
    """Profile one model and write its file; 2 on bad input (one line, nothing written)."""
    one = copy.copy(args)
    one.model = model
    try:
        profile = refit(ModelProfile.load(args.refit)) if args.refit else run(one)
    except (UsageError, ProfileError) as e:
        print(f"profile_model: error: {e}", file=sys.stderr)
        return 2
    profile.save(out)
    print(summary(profile))
    print(f"wrote {out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"profile_model: error: {e}", file=sys.stderr)
        return 2
    models = model_list(args) or [""]
    if len(models) == 1:
        return profile_one(args, models[0], args.out)
    failed = []
    for model in models:   # one process for a list: imports and CUDA start-up are paid once
        if args.time_budget is not None and time.time() - t0 > args.time_budget:
            print(f"profile_model: skipped {model}: --time-budget {args.time_budget:g} s spent", flush=True)
            failed.append(model)
            continue
        try:
            rc = profile_one(args, model, out_path(args.out, model))
        except Exception as e:  # noqa: BLE001 - report, free the GPU and go on with the next model
            import traceback
            traceback.print_exc()
            print(f"profile_model: {model} failed: {type(e).__name__}: {e}", flush=True)
            rc = 1
        if rc:
            failed.append(model)
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if failed:
        print(f"profile_model: not profiled: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
