"""Measure what DeepSpeed's engine adds to a training step, per ZeRO stage, into the model profile.

    python autotune/profile_engine.py --model bert-large --model-profile profiles/h100/bert-large.json

The layer profile (autotune/profile_model.py) times layers alone. A real step also runs the engine:
hooks on every micro-batch (gradient accumulation, ZeRO-2 buckets, ZeRO-3 gathers and releases) and
the optimizer boundary (casts, flattening, norms, master-weight copies). On one H100 that is 10-150 ms
a step for BERT-large, most of it CPU work per parameter tensor, which the layer times cannot show.

For each ZeRO stage this builds train.py's own engine (backends/deepspeed/engine.py) on one device,
runs steps of two micro-batches of `--micro-batch` samples and times, with a device sync between them:

    bare        forward + backward of the same model without any engine (reference, measured first)
    microbatch  engine forward + backward + step() off the accumulation boundary
    boundary    the same on the boundary, where the optimizer runs

and stores per stage: the engine's cost per micro-batch (microbatch - bare) and per step (boundary -
microbatch), with the memory the optimizer step allocates above what it finds (bytes per parameter).
The cost model (autotune/cost_model.py) spreads both over the layers by their parameter tensors.

Those times are host work at a launch-bound micro-batch, synchronised on both sides: a GPU-bound step hides
much of them (its host runs ahead, queueing the optimizer during the backward) and shows what they hold
on the GPU instead (ZeRO-1/2's gradient copies, a sync that lets the GPU run dry). So, on CUDA, stages 0-2
are also run as train.py runs them at a GPU-bound micro-batch (`--step-micro-batch`, by default the
smallest the cost model sees GPU-bound with the ZeRO-2 hooks), eager and as CUDA graphs, two micro-batches
a step, and the block keeps per stage and mode (`in_step`): the step's wall time, when the device had
finished the last backward (train.py's device_backward_s), and the tail after it. Beside them
(`bare_gpu`): the GPU time of the whole model's forward + backward without an engine at that micro-batch
and two smaller ones, back to back with nothing read back (at a GPU-bound batch the host runs ahead).
The same steps at the block's launch-bound micro-batch (`launch_bound`, eager and graphed) time the hooks'
host work as a graphed step runs it: when the host had queued the last backward, the GPU long idle; a bare
forward + backward timed beside them gives their host's speed against the block's. The hooks
of a graphed step need not cost what the eager block says: Swin-B's ZeRO-1 ones took ~21 ms a micro-batch in
graphed steps of one H100 (host 33.0 ms at ZeRO-1, 12.4 at ZeRO-0, batch 16) where its eager block has 10.2.
The profile's precision is the one measured. ZeRO-3 runs last: DeepSpeed leaves its buffers behind.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotune.model_profile import ModelProfile, ProfileError  # noqa: E402
from autotune.plan import write_json_atomic  # noqa: E402
from backends.gc_pause import automatic_gc_off  # noqa: E402

MB = 1024 * 1024


@dataclass
class Options:
    model: str
    task: str | None
    precision: str
    zero: list[int]
    micro_batch: int
    reps: int
    warmup: int
    checkpoint_layers: int
    stage_seconds: float = 60.0      # timed steps stop after this (at least 2): ZeRO-3 steps take seconds
    seed: int = 1234
    step_micro_batch: int | None = None   # the in-step runs' micro-batch; None: step_micro_batch_for's choice
    in_step: bool = True                  # also time stages 0-2 inside GPU-bound steps (CUDA only)


# ---------------------------------------------------------------------- timing helpers
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _allocated() -> int:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _timed(fn) -> float:
    """Milliseconds of fn() between two device syncs."""
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return (time.perf_counter() - t0) * 1e3


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- model pieces
def _sequence(choice, groups, seed: int):
    """The model cut into its layer sequence, exactly as train.py builds it."""
    import train
    from model_zoo.runtime import get_adapter

    adapter = get_adapter(choice.family)
    model = train.initial_model(adapter, choice, seed)
    adapter.tensor_parallelize(model, choice.task, groups.tp_groups)
    return adapter, adapter.layer_sequence(model, choice.task)


def one_rank_net(model: str, task: str | None, precision: str, seed: int = 1234):
    """(net, seq, batch): train.py's model on one rank as its pp = 1 module (SequentialWithLoss, nothing
    checkpointed) on the device, its layer sequence, and batch(b) giving the first micro-batch of a global
    batch of b samples on the device, for tools that measure pieces of the real sequence (the head's
    backward workspace, scripts/sequence_activation_probe.py)."""
    import train
    from autotune.plan import Plan
    from backends.data import SyntheticData
    from backends.deepspeed.engine import _to, device
    from backends.deepspeed.layers import SequentialWithLoss
    from backends.megatron.groups import build_parallel_groups, init_distributed
    from backends.megatron.random import seed_everything
    from model_zoo.common import TORCH_DTYPES
    from model_zoo.runtime import get_adapter

    init_distributed()
    choice = train.resolve_model(model, task, None)
    dev, dtype = device(), TORCH_DTYPES[precision]
    num_layers = get_adapter(choice.family).num_layers(choice.config)

    def plan(b: int) -> Plan:
        return Plan.uniform(num_layers=num_layers, world_size=1, global_bsz=b, chunks=1, precision=precision,
                            model={"name": model})

    groups = build_parallel_groups(plan(1))          # one rank: the same groups at every batch size
    seed_everything(seed, groups.rng_rank, groups.pp_rank)
    adapter, seq = _sequence(choice, groups, seed)
    net = SequentialWithLoss(seq, [0] * seq.num_layers).to(dev, dtype=dtype).train()

    def batch(b: int) -> tuple:
        inputs, labels = SyntheticData(adapter, choice.config, choice.task, plan(b), 0, seed,
                                       seq_len=choice.seq_len).micro_batches(0)[0]
        return _to(inputs, dev, dtype), _to(labels, dev)

    return net, seq, batch


def param_tensors(seq, layer_type_names: list[str]) -> dict:
    """Parameter tensors per layer type (one layer), and on the embeddings / head entries (tied ones once)."""
    seen: set[int] = set()

    def count(entries) -> int:
        n = 0
        for e in entries:
            for p in e.module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += 1
        return n

    first = count(seq.embed)
    per_type: dict[str, int] = {}
    for name, e in zip(layer_type_names, seq.layers):
        per_type[name] = count([e])
    return {"layers": per_type, "first": first, "last": count(seq.head)}


def _plan(opts: Options, num_layers: int, zero: int):
    from autotune.plan import Plan

    k = opts.checkpoint_layers
    return Plan.uniform(num_layers=num_layers, world_size=1, global_bsz=2 * opts.micro_batch, chunks=2,
                        zero_stage=zero, precision=opts.precision, checkpoint=[1] * k + [0] * (num_layers - k),
                        model={"name": opts.model})


def bare_step(model, inputs, labels) -> None:
    """One forward + backward of the bare pp = 1 module, gradients dropped (no engine accumulates them)."""
    model(inputs, labels).backward()
    for p in model.parameters():
        p.grad = None


def measure_bare(opts: Options, choice, plan, adapter, seq) -> float:
    """Median ms of forward + backward of the pp=1 model without an engine (gradients dropped each time)."""
    from backends.data import SyntheticData
    from backends.deepspeed.engine import _to, device
    from backends.deepspeed.layers import SequentialWithLoss
    from model_zoo.common import TORCH_DTYPES

    dtype = TORCH_DTYPES[opts.precision]
    model = SequentialWithLoss(seq, [0] * seq.num_layers).to(device(), dtype=dtype).train()
    inputs, labels = SyntheticData(adapter, choice.config, choice.task, plan, 0, opts.seed,
                                   seq_len=choice.seq_len).micro_batches(0)[0]
    inputs, labels = _to(inputs, device(), dtype), _to(labels, device())
    for _ in range(opts.warmup):
        bare_step(model, inputs, labels)
    with automatic_gc_off():       # as train.py trains
        return statistics.median(_timed(lambda: bare_step(model, inputs, labels)) for _ in range(opts.reps))


def _engine(opts: Options, choice, plan, cuda_graphs: bool = False):
    """(train.py's engine for `plan` on this rank, the layer sequence's adapter), seeded as train.py seeds."""
    from backends.deepspeed.engine import build_engine
    from backends.megatron.groups import build_parallel_groups
    from backends.megatron.random import seed_everything

    groups = build_parallel_groups(plan)
    seed_everything(opts.seed, groups.rng_rank, groups.pp_rank)
    adapter, seq = _sequence(choice, groups, opts.seed)
    return build_engine(plan, groups, seq, cuda_graphs=cuda_graphs), adapter


def _first_step_batches(opts: Options, choice, adapter, plan, trainer) -> list:
    """The first step's micro-batches of train.py's synthetic data, on the device."""
    from backends.data import SyntheticData

    data = SyntheticData(adapter, choice.config, choice.task, plan, 0, opts.seed, seq_len=choice.seq_len)
    return trainer.to_device(data.micro_batches(0))


def measure_stage(opts: Options, choice, zero: int, num_layers: int) -> dict:
    """Times and memory of train.py's engine at one ZeRO stage (two micro-batches per step)."""
    from backends.megatron.groups import destroy_parallel_groups

    plan = _plan(opts, num_layers, zero)
    base = _allocated()
    _reset_peak()
    trainer, adapter = _engine(opts, choice, plan)
    _sync()
    init_peak = _peak()
    micro = _first_step_batches(opts, choice, adapter, plan, trainer)
    engine = trainer.engine

    def micro_step(inputs, labels) -> None:
        loss = engine(inputs, labels)
        engine.backward(loss)
        engine.step()

    for _ in range(opts.warmup):
        trainer.train_step(micro)
    _sync()
    states = _allocated() - base
    mb_ms, boundary_ms = [], []
    t_end = time.perf_counter() + opts.stage_seconds
    with automatic_gc_off():       # as train.py trains
        while len(mb_ms) < opts.reps and (len(mb_ms) < 2 or time.perf_counter() < t_end):
            mb_ms.append(_timed(lambda: micro_step(*micro[0])))
            boundary_ms.append(_timed(lambda: micro_step(*micro[1])))
    # memory, untimed: the peaks of forward + backward and of the optimizer step, apart
    _reset_peak()
    micro_step(*micro[0])
    loss = engine(*micro[1])
    engine.backward(loss)
    _sync()
    before_step, backward_peak = _allocated(), _peak()
    _reset_peak()
    engine.step()
    _sync()
    step_peak = _peak()
    out = {"microbatch_ms": statistics.median(mb_ms), "boundary_ms": statistics.median(boundary_ms),
           "microbatch_ms_all": [round(x, 3) for x in mb_ms], "boundary_ms_all": [round(x, 3) for x in boundary_ms],
           "states_mb": states / MB, "init_peak_mb": (init_peak - base) / MB,
           "backward_peak_mb": (backward_peak - base) / MB,
           "before_step_mb": (before_step - base) / MB, "step_peak_mb": (step_peak - base) / MB,
           "params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())}
    out["step_transient_bytes_per_param"] = max(0, step_peak - before_step) / out["params"]
    out["init_bytes_per_param"] = max(0, init_peak - base) / out["params"]
    trainer.destroy()
    destroy_parallel_groups()
    return out


# ---------------------------------------------------------------------- on the device timeline of a GPU-bound step
IN_STEP_STAGES = (0, 1, 2)        # ZeRO-3 steps are host-bound at any batch (hooks and gathers per tensor)
IN_STEP_CHUNKS = 2                # an accumulating micro-batch and a boundary one, as the engine blocks run
STEP_BATCHES = (8, 16, 32, 64, 128, 256)
GPU_BOUND_MARGIN = 1.5            # GPU sum over host sum (ZeRO-2 hooks included) the in-step batch must reach
MEMORY_SHARE = 0.7                # of the device, at most, for the in-step runs' predicted peak


def step_micro_batch_for(spec, profile: ModelProfile, block: dict, device_gb: float) -> int:
    """The in-step runs' micro-batch: the smallest of STEP_BATCHES at which the cost model (this profile with the
    new block, uncalibrated) sees an eager ZeRO-2 step of two micro-batches GPU-bound by GPU_BOUND_MARGIN (the
    hooks' host work is the largest of stages 0-2), among those whose predicted ZeRO-1 peak (the largest of
    stages 0-2) stays under MEMORY_SHARE of the device; the largest that fits when none is that GPU-bound."""
    from autotune.calibrate import evaluate_run
    from autotune.cost_model import Calibration
    from autotune.hardware import load_hardware

    prof = ModelProfile.from_dict({**profile.to_dict(), "engine": block})
    hw = load_hardware("1xH100").with_layout(1, gpu_memory_gb=device_gb)
    fits = []
    for b in STEP_BATCHES:
        def predicted(zero: int):
            return evaluate_run(_in_step_plan(spec.num_layers, b, zero, prof.precision, spec.name), spec, hw, prof,
                                Calibration())
        if predicted(1).stage_memory[0]["total_mb"] > MEMORY_SHARE * device_gb * 1024:
            break
        fits.append(b)
        z2 = predicted(2).stage_costs[0]
        if z2.gpu_s >= GPU_BOUND_MARGIN * z2.host_s:
            return b
    return fits[-1] if fits else STEP_BATCHES[0]


def _in_step_plan(num_layers: int, b: int, zero: int, precision: str, model: str, graphs: bool = False):
    from autotune.plan import Plan

    plan = Plan.uniform(num_layers=num_layers, world_size=1, global_bsz=IN_STEP_CHUNKS * b, chunks=IN_STEP_CHUNKS,
                        zero_stage=zero, precision=precision, model={"name": model})
    plan.cuda_graphs = graphs
    return plan


def measure_in_step(opts: Options, choice, zero: int, num_layers: int, b: int, graphs: bool) -> dict:
    """train.py's steps at one ZeRO stage, two micro-batches of b samples (CUDA graphs or eager): medians of
    the step's wall time between syncs, of when the device had finished the last backward (before the optimizer
    step: StepResult.device_backward_s), of when the host had queued it (backward_queued_at) and of the tail
    after the device's end, as train.py records them."""
    from backends.megatron.groups import destroy_parallel_groups

    plan = _in_step_plan(num_layers, b, zero, opts.precision, opts.model, graphs)
    trainer, adapter = _engine(opts, choice, plan, cuda_graphs=graphs)
    micro = _first_step_batches(opts, choice, adapter, plan, trainer)
    for _ in range(max(2, opts.warmup)):          # a graphed run captures at the end of its first step
        trainer.train_step(micro)
    step, backward, queued = [], [], []
    with automatic_gc_off():
        for _ in range(opts.reps):
            _sync()
            t0 = time.perf_counter()
            r = trainer.train_step(micro)
            _sync()
            step.append((time.perf_counter() - t0) * 1e3)
            backward.append(r.device_backward_s() * 1e3)
            queued.append((r.backward_queued_at - t0) * 1e3)
    trainer.destroy()
    destroy_parallel_groups()
    return {"micro_batch": b, "chunks": IN_STEP_CHUNKS, "step_ms": statistics.median(step),
            "device_backward_ms": statistics.median(backward), "host_backward_ms": statistics.median(queued),
            "tail_ms": statistics.median(s - d for s, d in zip(step, backward)),
            "step_ms_all": [round(x, 3) for x in step], "device_backward_ms_all": [round(x, 3) for x in backward],
            "host_backward_ms_all": [round(x, 3) for x in queued]}


def measure_bare_gpu(opts: Options, batch_sizes: list[int]) -> dict:
    """GPU ms of the whole model's forward + backward without an engine (train.py's pp = 1 module, gradients
    dropped), per batch size: back-to-back iterations with nothing read back, timed between the ends of the 2nd
    and later ones, so at a GPU-bound batch the host runs ahead and the GPU runs the queue as a GPU-bound
    step does (a spin in front does not hold: a whole model's launches fill the launch queue first). The
    embeddings', head's and layers' GPU time together; `queued_ms`, the host's time per iteration beside it,
    tells a point that was not GPU-bound (near gpu_ms)."""
    import torch

    from autotune.profile_model import Clock
    from backends.megatron.groups import destroy_parallel_groups

    model, seq, batch = one_rank_net(opts.model, opts.task, opts.precision, opts.seed)
    clock = Clock(next(model.parameters()).device)
    out = {"batch_sizes": [], "gpu_ms": [], "queued_ms": []}
    for b in batch_sizes:
        inputs, labels = batch(b)
        with automatic_gc_off():
            for _ in range(opts.warmup):
                bare_step(model, inputs, labels)
            clock.sync()
            t0 = time.perf_counter()
            marks = [clock.mark()]
            for _ in range(opts.reps + 1):
                bare_step(model, inputs, labels)
                marks.append(clock.mark())
            queued = (time.perf_counter() - t0) * 1e3 / (opts.reps + 1)
            clock.sync()
        out["batch_sizes"].append(b)
        out["gpu_ms"].append(statistics.median(clock.ms(a, c) for a, c in zip(marks[1:-1], marks[2:])))
        out["queued_ms"].append(queued)
        del inputs, labels
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    del model, seq
    destroy_parallel_groups()
    return out


def bare_gpu_sizes(b: int) -> list[int]:
    """The bare GPU times' batch sizes: the in-step micro-batch, a half and a quarter of it."""
    return sorted({max(1, b // 4), max(1, b // 2), b})


def run(opts: Options, spec, progress=print, profile: ModelProfile | None = None) -> dict:
    """The engine block for the profile: per stage, overhead per micro-batch and per step, and raw data; on
    CUDA with `profile` (the layer profile, to pick the in-step micro-batch) also the in-step timings."""
    from backends.megatron.groups import init_distributed

    import train

    init_distributed()
    choice = train.resolve_model(opts.model, opts.task, None)
    n = spec.num_layers
    names = [spec.layer(i).name for i in range(n)]
    t0 = time.perf_counter()
    bare, tensors = bare_alone(opts, choice, n, names)
    progress(f"bare forward+backward: {bare:.2f} ms at micro-batch {opts.micro_batch}")
    block = {"micro_batch": opts.micro_batch, "checkpoint_layers": opts.checkpoint_layers,
             "bare_microbatch_ms": bare, "param_tensors": tensors,
             "tensors_total": sum(tensors["layers"][nm] for nm in names) + tensors["first"] + tensors["last"],
             "stages": {}}
    in_step = opts.in_step and profile is not None and _cuda()
    for z in sorted(opts.zero):
        if z == 3 and in_step:        # the in-step runs (stages 0-2) before ZeRO-3, which leaves buffers behind
            measure_in_steps(opts, choice, spec, profile, block, progress)
            in_step = False
        r = measure_stage(opts, choice, z, n)
        _free()                                    # the stage's engine and model are unreachable now
        r["overhead_microbatch_ms"] = max(0.0, r["microbatch_ms"] - bare)
        r["step_ms"] = max(0.0, r["boundary_ms"] - r["microbatch_ms"])
        block["stages"][str(z)] = r
        progress(f"ZeRO-{z}: micro-batch {r['microbatch_ms']:.2f} ms (engine +{r['overhead_microbatch_ms']:.2f}), "
                 f"step +{r['step_ms']:.2f} ms, optimizer-step transient "
                 f"{r['step_transient_bytes_per_param']:.2f} B/param, states {r['states_mb']:.0f} MB")
    if in_step:
        measure_in_steps(opts, choice, spec, profile, block, progress)
    block.update(seconds=round(time.perf_counter() - t0, 1),
                 command=" ".join(["python", "autotune/profile_engine.py", *sys.argv[1:]]),
                 date=time.strftime("%Y-%m-%d"))
    return block


def bare_alone(opts: Options, choice, n: int, names: list[str]) -> tuple[float, dict]:
    """(measure_bare's ms at the block's micro-batch, param_tensors) on a model built for it alone."""
    from backends.megatron.groups import build_parallel_groups, destroy_parallel_groups

    plan0 = _plan(opts, n, 0)
    adapter, seq = _sequence(choice, build_parallel_groups(plan0), opts.seed)
    tensors = param_tensors(seq, names)
    bare = measure_bare(opts, choice, plan0, adapter, seq)
    del seq
    _free()
    destroy_parallel_groups()
    return bare, tensors


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def measure_in_steps(opts: Options, choice, spec, profile: ModelProfile, block: dict, progress=print,
                     parts: tuple[str, ...] = ("in-step", "bare-gpu", "launch-bound"), b: int | None = None) -> None:
    """Of the measured stages among 0-2, into `block`: the in-step timings at a GPU-bound micro-batch b (eager,
    then graphed: stages[z]["in_step"]), the bare GPU times ("bare_gpu") and the same steps at the block's
    launch-bound micro-batch (stages[z]["launch_bound"]), as `parts` names them."""
    import torch

    stages = [z for z in sorted(opts.zero) if z in IN_STEP_STAGES]
    if "launch-bound" in parts:
        n = spec.num_layers
        bare = bare_alone(opts, choice, n, [spec.layer(i).name for i in range(n)])[0]     # this host's speed
        progress(f"bare forward+backward beside the launch-bound steps: {bare:.2f} ms at micro-batch "
                 f"{opts.micro_batch}")
        for z in stages:
            block["stages"][str(z)]["launch_bound"] = {
                mode: {**r, "bare_microbatch_ms": bare}
                for mode, r in _timed_modes(opts, choice, z, n, opts.micro_batch, progress).items()}
    if not {"in-step", "bare-gpu"} & set(parts):
        return
    b = b or opts.step_micro_batch or step_micro_batch_for(
        spec, profile, block, torch.cuda.get_device_properties(0).total_memory / 2**30)
    for z in stages if "in-step" in parts else ():
        block["stages"][str(z)]["in_step"] = _timed_modes(opts, choice, z, spec.num_layers, b, progress)
    if "bare-gpu" in parts:
        add_bare_gpu(opts, b, block, progress)


def _timed_modes(opts: Options, choice, z: int, n: int, b: int, progress) -> dict:
    """{'eager': ..., 'graphed': ...}: measure_in_step at ZeRO-z and micro-batch b in both modes (a mode that ran
    out of memory left out)."""
    modes = {}
    for mode, graphs in (("eager", False), ("graphed", True)):
        r = _timed_step(opts, choice, z, n, b, graphs, progress)
        if r is not None:
            modes[mode] = r
            progress(f"ZeRO-{z} {mode} in a step of {IN_STEP_CHUNKS} x {b}: {r['step_ms']:.2f} ms, last backward "
                     f"queued at {r['host_backward_ms']:.2f}, done at {r['device_backward_ms']:.2f}, "
                     f"tail {r['tail_ms']:.2f}")
    return modes


def _timed_step(opts: Options, choice, z: int, n: int, b: int, graphs: bool, progress) -> dict | None:
    """measure_in_step, or None (said) when it runs out of memory: the block stays usable without it."""
    import torch

    from backends.megatron.groups import destroy_parallel_groups

    try:
        return measure_in_step(opts, choice, z, n, b, graphs)
    except torch.cuda.OutOfMemoryError:
        progress(f"ZeRO-{z} {'graphed' if graphs else 'eager'} in a step of {IN_STEP_CHUNKS} x {b}: out of memory, "
                 "not measured")
        destroy_parallel_groups()
        return None
    finally:
        _free()


def add_bare_gpu(opts: Options, b: int, block: dict, progress=print) -> None:
    block["bare_gpu"] = bg = measure_bare_gpu(opts, bare_gpu_sizes(b))
    _free()
    progress("bare forward+backward GPU time: " + ", ".join(
        f"{g:.2f} ms at {x} (host {q:.2f})" for x, g, q in zip(bg["batch_sizes"], bg["gpu_ms"], bg["queued_ms"])))


def keep_unmeasured_stages(block: dict, old: dict | None) -> None:
    """Carry the stages this run did not measure over from the profile's earlier engine block, when that block
    was measured the same way (micro-batch, checkpointed layers, device): re-measuring ZeRO-0 after a change to
    its optimizer step keeps stages 1-3. Each kept stage records the date it was measured and the bare forward +
    backward it was measured beside, that host's speed (ModelProfile.engine_stage_host_speed)."""
    if not old or any(old.get(k) != block.get(k) for k in ("micro_batch", "checkpoint_layers", "device")):
        return
    for z, stage in old.get("stages", {}).items():
        if z not in block["stages"]:
            block["stages"][z] = {"measured": old.get("date"), "bare_microbatch_ms": old.get("bare_microbatch_ms"),
                                  **stage}


# ---------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="preset name, HF config .json or checkpoint folder")
    ap.add_argument("--task", default=None)
    ap.add_argument("--model-profile", required=True,
                    help="profile to add the 'engine' block to (its precision is the one measured)")
    ap.add_argument("--zero", default="0,1,2,3", help="ZeRO stages to measure (default 0,1,2,3)")
    ap.add_argument("--micro-batch", type=int, default=1, help="samples per micro-batch (default 1: launch-bound)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per stage (median; default GPU 8, CPU 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default GPU 3, CPU 1)")
    ap.add_argument("--stage-seconds", type=float, default=60.0,
                    help="stop timing a stage after this many seconds (at least 2 steps; default 60)")
    ap.add_argument("--checkpoint-layers", type=int, default=0,
                    help="checkpoint the first K layers (a diagnostic of memory phases; use with --out)")
    ap.add_argument("--step-micro-batch", type=int, default=None,
                    help="micro-batch of the in-step timings (CUDA; default: the smallest the cost model sees "
                         "GPU-bound with ZeRO-2's hooks)")
    ap.add_argument("--no-in-step", action="store_true", help="skip the in-step timings and the bare GPU times")
    ap.add_argument("--only", default=None,
                    help="only (re)measure these parts of the profile's engine block, comma-separated among "
                         f"{','.join(ONLY_PARTS)} (stages among --zero 0-2), keeping the rest; the in-step "
                         "micro-batch is the block's (or --step-micro-batch)")
    ap.add_argument("--bare-gpu-only", action="store_true", help="the same as --only bare-gpu")
    ap.add_argument("--out", default=None, help="also write the block to this JSON file")
    ap.add_argument("--no-update", action="store_true", help="do not write the block into --model-profile")
    return ap.parse_args(argv)


ONLY_PARTS = ("in-step", "bare-gpu", "launch-bound")


def refresh_parts(args: argparse.Namespace, profile: ModelProfile, spec, parts: tuple[str, ...], zero: list[int]) -> int:
    """--only: the named parts measured again into the profile's existing engine block, the rest kept."""
    import copy

    from backends.megatron.groups import init_distributed

    import train

    block = copy.deepcopy(profile.engine or {})
    missing = [z for z in zero if z in IN_STEP_STAGES and str(z) not in block.get("stages", {})] \
        if {"in-step", "launch-bound"} & set(parts) else []
    timed = (profile.engine_in_step(z, mode) for z in IN_STEP_STAGES for mode in ("eager", "graphed"))
    b = args.step_micro_batch or next((r["micro_batch"] for r in timed if r), None)
    if missing or b is None and {"in-step", "bare-gpu"} & set(parts):     # launch-bound: the block's micro-batch
        why = (f"has no ZeRO-{missing[0]} stage to add to (measure the block whole first)" if missing else
               "has no in-step timings to take the micro-batch from: give --step-micro-batch")
        print(f"error: --only {','.join(parts)}: {args.model_profile}'s engine block {why}", file=sys.stderr)
        return 2
    opts = Options(model=args.model, task=args.task, precision=profile.precision, zero=zero,
                   micro_batch=int(block.get("micro_batch") or 1),
                   reps=args.reps or 8, warmup=args.warmup if args.warmup is not None else 3, checkpoint_layers=0)
    if parts != ("bare-gpu",) and not _cuda():
        print(f"error: --only {','.join(parts)} times train.py steps, eager and graphed, on a CUDA device; "
              "run it on the GPU", file=sys.stderr)
        return 2
    init_distributed()
    choice = train.resolve_model(args.model, args.task, None)
    measure_in_steps(opts, choice, spec, profile, block, lambda s: print(f"[profile_engine {args.model}] {s}",
                                                                           flush=True), parts, b)
    ModelProfile.set_block(args.model_profile, "engine", block)
    print(f"wrote {', '.join(parts)} into {args.model_profile}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    import torch

    from model_zoo import get_model_spec
    from model_zoo.registry import ModelInputError

    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    try:
        profile = ModelProfile.load(args.model_profile)
        zero = [int(z) for z in args.zero.split(",") if z.strip()]
        if not zero or any(z not in (0, 1, 2, 3) for z in zero):
            raise ValueError(f"--zero {args.zero!r}: give stages among 0,1,2,3, e.g. 0,1,2,3")
        if args.micro_batch < 1 or args.step_micro_batch is not None and args.step_micro_batch < 1:
            raise ValueError("--micro-batch and --step-micro-batch must be at least 1")
        parts = tuple(p.strip() for p in (args.only or "bare-gpu").split(",") if p.strip())
        if not parts or any(p not in ONLY_PARTS for p in parts):
            raise ValueError(f"--only {args.only!r}: give parts among {','.join(ONLY_PARTS)}")
        if args.reps is not None and args.reps < 2 or args.warmup is not None and args.warmup < 0:
            raise ValueError("--reps must be at least 2 and --warmup at least 0")
        spec = get_model_spec(args.model, precision=profile.precision, task=args.task)
        if not 0 <= args.checkpoint_layers <= spec.num_layers:
            raise ValueError(f"--checkpoint-layers must be in 0..{spec.num_layers}")
        if spec.name != profile.model and os.path.basename(str(spec.name)) != profile.model:
            raise ValueError(f"--model {args.model} but {args.model_profile} profiles {profile.model}; "
                             f"give the profile of the same model")
    except (ProfileError, ModelInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.only or args.bare_gpu_only:
        return refresh_parts(args, profile, spec, parts, zero)
    opts = Options(model=args.model, task=args.task, precision=profile.precision, zero=zero,
                   micro_batch=args.micro_batch, reps=args.reps if args.reps is not None else (8 if gpu else 2),
                   warmup=args.warmup if args.warmup is not None else (3 if gpu else 1), checkpoint_layers=args.checkpoint_layers,
                   stage_seconds=args.stage_seconds, step_micro_batch=args.step_micro_batch,
                   in_step=not args.no_in_step)
    block = run(opts, spec, progress=lambda s: print(f"[profile_engine {opts.model}] {s}", flush=True),
                profile=profile)
    block["device"] = torch.cuda.get_device_name() if gpu else "cpu"
    keep_unmeasured_stages(block, profile.engine)
    if args.out:
        write_json_atomic(args.out, block)
    if not args.no_update:
        ModelProfile.set_block(args.model_profile, "engine", block)
        print(f"wrote the engine block into {args.model_profile}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
