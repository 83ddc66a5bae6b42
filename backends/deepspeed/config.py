"""The DeepSpeed config generated from a plan (never hand-written).

The bucket sizes set here are the ones the cost model charges memory for (autotune/cost_model.py
imports them), so prediction and engine agree by construction.
"""
from __future__ import annotations

from autotune.plan import Plan, write_json_atomic

# ZeRO-1/2: gradients are reduced in buckets of this many elements (DeepSpeed default 5e8 is
# a 1 GB fp16 buffer; 5e7 keeps the buffer small at no measurable bandwidth cost for >=50 MB messages).
REDUCE_BUCKET_ELEMS = 50_000_000
ALLGATHER_BUCKET_ELEMS = 50_000_000
# ZeRO-3: parameters are prefetched in buckets of this many elements; parameters smaller than the
# persistence threshold stay unpartitioned on every rank (DeepSpeed defaults: 5e7 and 1e5).
STAGE3_PREFETCH_ELEMS = 50_000_000
STAGE3_PERSISTENCE_THRESHOLD = 100_000
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
GRADIENT_CLIPPING = 1.0


def deepspeed_dp_size(plan: Plan) -> int:
    """DeepSpeed's data-parallel group size for `plan` (what its batch sizes and ZeRO partitions use):
    world / (pp * tp) for one TP layout; for per-layer layouts, the ranks holding identical parameters in
    every layer (backends/megatron/layerwise.py)."""
    from backends.megatron.layerwise import LayerwiseLayout, needs_layerwise

    return LayerwiseLayout.from_plan(plan).zero_dp if needs_layerwise(plan) else plan.dp_deg


def make_ds_config(plan: Plan, lr: float = 1e-4, weight_decay: float = 0.01, betas=(0.9, 0.999),
                   eps: float = 1e-8, torch_adam: bool = True, fused: bool | None = None,
                   autocast: bool = False) -> dict:
    """DeepSpeed JSON for `plan`: batch sizes, ZeRO stage and buckets, precision, clipping, AdamW.

    `torch_adam` (default) selects torch.optim.AdamW rather than DeepSpeed's FusedAdam, a JIT-built
    extension (DeepSpeed 0.19.8 cannot parse the arch list "9.0a" of Hopper GPUs, and on CPU it
    needs a compiler); `fused` asks torch for its fused kernel (the runtime always does: torch has it for CUDA and CPU).
    `autocast` runs a bf16/fp16 plan as torch autocast over fp32 weights (DeepSpeed's `torch_autocast`
    section) instead of DeepSpeed's bf16/fp16 engine with its separate fp32 master copy.
    """
    if plan.world_size is None:
        raise ValueError("plan.world_size must be known to build the DeepSpeed config")
    zero: dict = {"stage": plan.zero_stage}
    if plan.zero_stage in (1, 2):
        zero.update(reduce_bucket_size=REDUCE_BUCKET_ELEMS, allgather_bucket_size=ALLGATHER_BUCKET_ELEMS,
                    overlap_comm=plan.zero_stage == 2, contiguous_gradients=plan.zero_stage == 2,
                    reduce_scatter=True)
    elif plan.zero_stage == 3:
        zero.update(reduce_bucket_size=REDUCE_BUCKET_ELEMS, stage3_prefetch_bucket_size=STAGE3_PREFETCH_ELEMS,
                    stage3_param_persistence_threshold=STAGE3_PERSISTENCE_THRESHOLD,
                    stage3_max_live_parameters=STAGE3_MAX_LIVE_PARAMETERS, overlap_comm=True,
                    contiguous_gradients=True)
    cfg = {
        # DeepSpeed checks train_batch = micro-batch x accumulation x its data-parallel size
        "train_batch_size": plan.global_bsz,
        "train_micro_batch_size_per_gpu": plan.global_bsz // (plan.chunks * deepspeed_dp_size(plan)),
        "gradient_accumulation_steps": plan.chunks,
        "gradient_clipping": GRADIENT_CLIPPING,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": eps,
                                                   "weight_decay": weight_decay}},
        "bf16": {"enabled": plan.precision == "bf16" and not autocast},
        "fp16": {"enabled": plan.precision == "fp16" and not autocast, "initial_scale_power": 16},
        # Stages send whole activations (what the cost model charges). DeepSpeed's default splits the
        # first sent tensor over the TP group, which only works when a stage sends exactly one tensor that
        # needs a gradient and the next stage takes a tuple of more than one (T5 sends several; ViT/Swin one).
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default) synchronises the device at every forward and every
        # engine.step(), i.e. at each micro-batch boundary, so the host could not queue the next micro-batch
        # while the GPU ran the last backward; train.py times its steps itself
        "timers": {"throughput": {"enabled": False}},
    }
    if torch_adam:
        cfg["optimizer"]["params"]["torch_adam"] = True
        if fused is not None:
            cfg["optimizer"]["params"]["fused"] = fused
    if autocast and plan.precision in ("bf16", "fp16"):
        cfg["torch_autocast"] = {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[plan.precision]}
    elif plan.precision in ("bf16", "fp16") and plan.zero_stage >= 1:
        # Accumulate gradients in fp32 across micro-batches (numerically safe; what the cost model charges).
        # DeepSpeed refuses fp32 accumulation without ZeRO, so stage 0 accumulates in the model dtype.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def write_ds_config(plan: Plan, path: str, **optim) -> dict:
    cfg = make_ds_config(plan, **optim)
    write_json_atomic(path, cfg)
    return cfg
