"""Plan + layer sequence -> a DeepSpeed engine and one training step over a global batch.

pp = 1: DeepSpeedEngine over the whole sequence (ZeRO 0-3), the Megatron mpu for TP/DP groups,
        `chunks` micro-batches of gradient accumulation.
pp > 1: DeepSpeed PipelineEngine over a PipelineModule with the plan's partition (ZeRO 0-1),
        `chunks` pipeline micro-batches (1F1B).
Both return the mean loss over the whole global batch (all micro-batches, all DP replicas).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt
from deepspeed.runtime.utils import clip_grad_norm_

from autotune.plan import Plan
from autotune.profile_model import Clock
from backends.deepspeed import fast_clip, fast_step
from backends.deepspeed.config import make_ds_config
from backends.deepspeed.graphs import LayerGraphs, graph_refusal, on_stream, training_stream
from backends.deepspeed.layers import SequentialWithLoss
from backends.deepspeed.pipeline import build_pipeline_module, tag_gradient_norm_owners
from backends.megatron.groups import ParallelGroups
from backends.megatron.mpu import LayerwiseMPU, MegatronMPU
from model_zoo.adapter import LayerSequence
from model_zoo.common import TORCH_DTYPES, carry_mask_answer

fast_clip.install()                         # DeepSpeed's bf16 clipping without per-tensor kernels / host sync
fast_step.install()                         # its ZeRO-0 bf16/fp16 step in multi-tensor ops, one host read
MicroBatch = tuple[Any, torch.Tensor]       # (first-entry inputs, labels)


@dataclass
class StepResult:
    loss: float                      # mean over the whole global batch
    grad_norm: float | None          # global gradient 2-norm before clipping
    # time.perf_counter() / time.process_time() when the host had queued the whole step, before it read the
    # loss back: a caller's step timer split into host launch time and the GPU's tail (launch-bound or not)
    queued_at: float | None = None
    queued_cpu: float | None = None
    # perf_counter when the last backward was queued, before DeepSpeed's optimizer step (which reads the norm or
    # the overflow flag back, so the host waits for the GPU there), and device marks (autotune.profile_model.Clock)
    # at the step's start and at that point; None under a pipeline (DeepSpeed's train_batch runs all of it)
    backward_queued_at: float | None = None
    backward_marks: tuple[Any, Any] | None = None

    def device_backward_s(self) -> float | None:
        """When the device finished the last backward, from the step's start; read it after the step has been
        synchronised (CUDA events). Beside backward_queued_at: near it, the host's launches set the pace."""
        if self.backward_marks is None:
            return None
        return _CLOCK.ms(*self.backward_marks) / 1e3


def _queued() -> dict[str, float]:
    return {"queued_at": time.perf_counter(), "queued_cpu": time.process_time()}


_CLOCK = Clock(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class TrainEngine:
    engine: Any                      # deepspeed DeepSpeedEngine or PipelineEngine
    plan: Plan
    groups: ParallelGroups
    ds_config: dict
    autocast: bool = False           # fp32 weights under torch autocast: float inputs stay fp32
    graphs: LayerGraphs | None = None  # --cuda-graphs: captured at the end of the first step

    @property
    def pipelined(self) -> bool:
        return self.plan.pp_deg > 1

    def to_device(self, micro_batches: list[MicroBatch]) -> list[MicroBatch]:
        """The micro-batches on this rank's device, float inputs in the compute dtype (a no-op when there)."""
        dev = device()
        dtype = torch.float32 if self.autocast else TORCH_DTYPES[self.plan.precision]
        return [(_to(inp, dev, dtype), _to(lab, dev)) for inp, lab in micro_batches]

    def train_step(self, micro_batches: list[MicroBatch]) -> StepResult:
        """One optimizer step over this rank's micro-batches (moved to the device first if needed)."""
        if len(micro_batches) != self.plan.chunks:
            raise ValueError(f"expected {self.plan.chunks} micro-batches, got {len(micro_batches)}")
        if self.pipelined:
            moved = self.to_device(micro_batches)
            loss = self.engine.train_batch(data_iter=iter(moved))
            if self.groups.layerwise is not None:
                loss = self._layerwise_mean(self.engine.dp_group_loss if self.engine.is_last_stage() else None)
            queued = _queued()
            return StepResult(float(loss), _norm(self.engine.get_global_grad_norm()), **queued)
        with on_stream(self.stream):
            moved = self.to_device(micro_batches)
            if self.graphs is not None and not self.graphs.captured:
                done: list[StepResult] = []
                self.graphs.record(lambda: done.append(self._step(moved)))
                if dist.get_rank() == 0:
                    print(f"[train] {self.graphs.summary()}", flush=True)
                return done[0]
            return self._step(moved)

    @property
    def stream(self) -> Any:
        """The side stream a --cuda-graphs run trains on (backends/deepspeed/graphs.py), or None."""
        return self.graphs.stream if self.graphs is not None else None

    def _step(self, moved: list[MicroBatch]) -> StepResult:
        """train_step's pp = 1 path: forward, backward and DeepSpeed's step per micro-batch."""
        start = _CLOCK.mark()
        total = torch.zeros((), device=device(), dtype=torch.float32)
        for i, (inputs, labels) in enumerate(moved):
            loss = self.engine(inputs, labels)
            self.engine.backward(loss)
            if i == len(moved) - 1:
                end = _CLOCK.mark()
                backward = {"backward_queued_at": time.perf_counter(), "backward_marks": (start, end)}
            self.engine.step()
            total += loss.detach().float()
        total /= len(moved)
        if self.groups.layerwise is not None:
            total = self._layerwise_mean(total)
        elif self.groups.dp > 1:
            dist.all_reduce(total, group=self.groups.dp_group)
            total /= self.groups.dp
        queued = _queued()
        return StepResult(float(total), _norm(self.engine.get_global_grad_norm()), **queued, **backward)

    def _layerwise_mean(self, loss: torch.Tensor | None) -> torch.Tensor:
        """Per-layer TP: each last-stage rank holds the mean loss of its head TP group's samples (groups of
        equal size), so the global mean is the mean over the last stage's ranks."""
        total = torch.zeros((), device=device(), dtype=torch.float32)
        if loss is not None:
            total += loss.detach().float()
        dist.all_reduce(total)
        return total / self.groups.layerwise.lw.B

    def eval_step(self, micro_batches: list[MicroBatch], stats_fn) -> torch.Tensor | None:
        """Collective: forward only (dropout off, no gradients) over this rank's micro-batches, with
        `stats_fn(output, labels) -> 1-D tensor` where the loss would be; the sum of its results on
        the last pipeline stage (every rank when pp = 1), None on the other stages."""
        if len(micro_batches) != self.plan.chunks:
            raise ValueError(f"expected {self.plan.chunks} micro-batches, got {len(micro_batches)}")
        moved = self.to_device(micro_batches)
        module = self.engine.module
        loss_fn, module.loss_fn = module.loss_fn, stats_fn
        try:
            if self.pipelined:
                self.engine.total_loss = None      # eval adds its outputs to the last training loss otherwise
                outs = self.engine.eval_batch(iter(moved), compute_loss=True, reduce_output=None, bcast_loss=False)
                return sum(outs) if self.engine.is_last_stage() else None
            self.engine.eval()
            with torch.no_grad(), on_stream(self.stream):
                return sum(self.engine(inputs, labels) for inputs, labels in moved)
        finally:
            module.loss_fn = loss_fn
            if self.pipelined:
                self.engine.total_loss = None
            self.engine.train()

    def save(self, save_dir: str, tag: str, client_state: dict | None = None) -> None:
        """Collective: a DeepSpeed checkpoint in save_dir/tag, named `latest` only once it is complete.

        Every rank writes under a temporary tag; after a barrier rank 0 renames the folder to `tag` and
        replaces the `latest` file atomically, so a crash mid-save leaves the previous `latest` intact.
        (Assumes save_dir is one shared folder, as DeepSpeed's own `latest` does.)
        """
        import glob
        import shutil

        tmp_tag = f".tmp-{tag}"
        self.engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=client_state or {}, save_latest=False)
        dist.barrier()
        if dist.get_rank() == 0:
            final = os.path.join(save_dir, tag)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(os.path.join(save_dir, tmp_tag), final)
            latest_tmp = os.path.join(save_dir, f".latest.tmp-{os.getpid()}")
            with open(latest_tmp, "w") as f:
                f.write(tag)
                f.flush()
                os.fsync(f.fileno())
            os.replace(latest_tmp, os.path.join(save_dir, "latest"))
            for stale in glob.glob(os.path.join(save_dir, ".tmp-*")):    # left by a run killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()

    def load_latest(self, save_dir: str, module_only: bool = False) -> dict | None:
        """Collective: load the checkpoint `latest` names (module, optimizer, scheduler; only the
        module weights with `module_only`); its client state, or None when save_dir holds no
        checkpoint yet."""
        if not os.path.isfile(os.path.join(save_dir, "latest")):
            return None
        path, client_state = self.engine.load_checkpoint(save_dir, load_module_only=module_only)
        if path is None:
            raise RuntimeError(f"could not load the latest checkpoint in {save_dir}")
        return client_state or {}

    def full_state_dict(self, layout) -> dict | None:
        """Collective: the trained weights by HF name, unsharded (TP, pipeline stages, ZeRO-3), on rank 0.

        `layout` is backends.export.capture_layout(model) taken before the engine was built.
        """
        from backends.export import gather_full_state_dict

        owned = {id(p) for p in self.engine.module.parameters()}
        return gather_full_state_dict(layout, owned, first_of_stage=self.groups.stage_leader)

    def destroy(self) -> None:
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()


def _norm(x: Any) -> float | None:
    return None if x is None else float(x)


def _record_fp32_grad_norm(engine: Any) -> None:
    """Keep the gradient norm DeepSpeed computes when clipping without ZeRO or mixed precision.

    On that path DeepSpeedEngine.clip_fp32_gradients discards the norm, so get_global_grad_norm()
    would return None; the replacement makes the same call and stores the result.
    """
    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_fp32_gradients


def _to(x: Any, dev: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Move to the device; floating inputs (pixels) take the model's dtype, integer ones (ids) stay. An
    attention mask keeps the host's answer to "does it mask anything" (model_zoo.common.answer_on_host)."""
    if torch.is_tensor(x):
        if float_dtype is not None and x.is_floating_point():
            return x.to(dev, dtype=float_dtype, non_blocking=True)
        return carry_mask_answer(x, x.to(dev, non_blocking=True))
    return tuple(_to(t, dev, float_dtype) for t in x)


def build_engine(plan: Plan, groups: ParallelGroups, seq: LayerSequence, *, lr: float = 1e-4,
                 weight_decay: float = 0.01, eps: float = 1e-8, autocast: bool = False,
                 compile_mode: str | None = None, cuda_graphs: bool = False) -> TrainEngine:
    """deepspeed.initialize with the config generated from the plan.

    `autocast`: see make_ds_config (pp = 1 only: DeepSpeed's pipeline engine has no autocast).
    `compile_mode`: torch.compile each Transformer layer in this torch.compile mode (one compiled graph serves
    all equal layers); None leaves them eager. `cuda_graphs`: graph every plain layer's eager kernels after
    the first step (backends/deepspeed/graphs.py; graph_refusal says which plans cannot).
    """
    autocast = autocast and plan.pp_deg == 1 and plan.precision in ("bf16", "fp16")
    os.environ.setdefault("LOCAL_RANK", "0")       # DeepSpeed's PipelineModule insists on it
    deepspeed.init_distributed(dist_backend=dist.get_backend())   # adopts the existing torch.distributed world
    mpu = LayerwiseMPU(groups) if groups.layerwise is not None else MegatronMPU()
    ds_ckpt.configure(mpu, partition_activations=False, contiguous_checkpointing=False, checkpoint_in_cpu=False,
                      synchronize=False, profile=False)
    # torch's fused AdamW (CUDA and CPU kernels): one kernel for all tensors, and the CPU tests run the GPUs' path
    cfg = make_ds_config(plan, lr=lr, weight_decay=weight_decay, eps=eps, torch_adam=True, fused=True,
                         autocast=autocast)
    if cuda_graphs:
        refusal = graph_refusal(plan, compile_mode, torch.cuda.is_available())
        if refusal:
            raise ValueError(refusal)
    if compile_mode is not None:
        compile_layers(plan, seq, compile_mode)
    wrap = _prepare_layerwise(plan, groups, seq) if groups.layerwise is not None else None
    if plan.pp_deg > 1:
        model = build_pipeline_module(plan, groups, seq, wrap)
        engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    else:
        model = SequentialWithLoss(seq, plan.checkpoint, wrap)
        tag_gradient_norm_owners(model, groups)
        stream = training_stream() if cuda_graphs else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with on_stream(stream):
            model.to(device())
            engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters(), mpu=mpu)
    if plan.zero_stage == 0 and (plan.precision == "fp32" or autocast):
        _record_fp32_grad_norm(engine)
    _skip_lone_allreduce(engine, plan, groups)
    graphs = None
    if cuda_graphs and not all(plan.checkpoint):     # every layer checkpointed: nothing to graph
        n = len(seq.embed)
        graphs = LayerGraphs([model.entries[n + i] for i, flag in enumerate(plan.checkpoint) if not flag], stream)
    return TrainEngine(engine=engine, plan=plan, groups=groups, ds_config=cfg, autocast=autocast, graphs=graphs)


# torch.compile modes that capture CUDA graphs -> the same mode without them.
CUDAGRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def check_compile_mode(plan: Plan, mode: str | None) -> None:
    """ValueError for a compile mode this plan cannot run (see compile_layers)."""
    if mode in CUDAGRAPH_MODES and plan.pp_deg > 1:
        raise ValueError(f"--compile {mode} (CUDA graphs) is not supported with pp > 1 (this plan has pp = "
                         f"{plan.pp_deg}); use --compile default or --compile {CUDAGRAPH_MODES[mode]}")


def compile_layers(plan: Plan, seq: LayerSequence, mode: str) -> None:
    """torch.compile each Transformer layer (one compiled graph serves all equal layers).

    CUDA graphs replay into static output buffers. A checkpointed layer runs its forward again inside
    backward, and with CUDA graphs that overwrote outputs still in use (T5-large on one H100, checkpointed
    layers compiled with or without graphs: "accessing tensor output of CUDAGraphs that has been
    overwritten"), so under those modes checkpointed layers stay eager. DeepSpeed's pipeline schedule
    interleaves micro-batches in ways not tried with CUDA graphs: refused.
    """
    check_compile_mode(plan, mode)
    for entry, flag in zip(seq.layers, plan.checkpoint):
        if not (flag and mode in CUDAGRAPH_MODES):
            entry.module.compile(mode=mode)


def _prepare_layerwise(plan: Plan, groups: ParallelGroups, seq: LayerSequence):
    """Per-layer TP (backends/megatron/layerwise.py): gradient hooks and norm owners on the parameters,
    and the wrapper that re-lays out activations."""
    from backends.megatron.layerwise import check_sequence, prepare_gradients, wrap_layer

    rg = groups.layerwise
    check_sequence(seq, rg.lw)
    prepare_gradients(seq, rg)
    return lambda module, i: wrap_layer(module, i, rg, plan)


def _skip_lone_allreduce(engine: Any, plan: Plan, groups: ParallelGroups) -> None:
    """With one data-parallel rank, DeepSpeed's gradient all-reduce still flattens every gradient
    into a bucket, reduces it over a group of one and copies it back (0.3 s a step for BERT-base on
    CPU). Turn it off where that is all it does: stage 0, and stage 1 under BF16_Optimizer; ZeRO's own
    optimizers also fill their partitions in that call, so they keep it."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if groups.dp == 1 and plan.pp_deg == 1 and (plan.zero_stage == 0 or isinstance(engine.optimizer, BF16_Optimizer)):
        engine.enable_backward_allreduce = False
