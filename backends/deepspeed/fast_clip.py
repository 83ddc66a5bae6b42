"""Gradient norm, clipping and the overflow check of DeepSpeed's bf16/fp16 optimizers without a kernel
per tensor and without a host synchronisation per tensor.

DeepSpeed 0.19's `get_global_norm_of_tensors` launches one norm kernel per gradient and
`clip_tensors_by_global_norm` decides `if clip_coef < 1` on the host, which waits for the whole
backward pass and then launches one multiply per gradient. On one H100 that was 21 ms of a 101 ms
ViT-L step (scripts/bench_engine_modes.py, ds-bf16-z1 vs ds-bf16-z1-noclip). These replacements
compute the same quantities with `torch._foreach_norm` / `torch._foreach_mul_` and clamp the
coefficient on the device instead (multiplying by exactly 1.0 leaves a gradient unchanged, so the
result equals DeepSpeed's). Anything but the plain L2 case (inf-norm, MoE expert groups) goes to
DeepSpeed's own code.

The overflow check of DeepSpeed's bf16 stage-0 optimizer (`FP16_Optimizer` with bf16, which DeepSpeed
picks for ZeRO stage 0) sums every gradient in fp32 and reads each sum back on the host, one
synchronisation per tensor; `has_overflow_serial` below takes one max-abs per tensor with
`torch._foreach_norm(inf)` and reads back one flag.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.runtime import bf16_optimizer
from deepspeed.runtime import utils as ds_utils

_ORIGINAL_NORM = ds_utils.get_global_norm_of_tensors
_ORIGINAL_CLIP = ds_utils.clip_tensors_by_global_norm
_ORIGINAL_OVERFLOW = ds_utils.CheckOverflow.has_overflow_serial


def global_norm(input_tensors, norm_type=2, mpu=None, moe_ep_group=None):
    """L2 norm of all tensors, summed over the model-parallel group as DeepSpeed does; -1 if not finite."""
    tensors = [t.detach() for t in input_tensors]
    if float(norm_type) != 2.0 or moe_ep_group is not None or not tensors:
        return _ORIGINAL_NORM(input_tensors, norm_type=norm_type, mpu=mpu, moe_ep_group=moe_ep_group)
    fp32 = [t if t.dtype == torch.float32 else t.float() for t in tensors]
    total = torch.stack(torch._foreach_norm(fp32, 2.0)).pow(2).sum()
    if mpu is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mpu.get_model_parallel_group())
    total = total.sqrt()
    ds_utils.mask_nan_or_inf_with_val_inplace(total, device=total.device)
    return total


def clip_by_global_norm(input_tensors, max_norm=1.0, global_norm=None, mpu=None, eps=1e-6):
    """Scale the tensors by min(1, max_norm / (norm + eps)) in place; returns the norm."""
    if global_norm is None:
        global_norm = ds_utils.get_global_norm_of_tensors(input_tensors, mpu=mpu)
    if not torch.is_tensor(global_norm):
        return _ORIGINAL_CLIP(input_tensors, max_norm=max_norm, global_norm=global_norm, mpu=mpu, eps=eps)
    tensors = [t.detach() for t in input_tensors]
    if tensors:
        coef = (max_norm / (global_norm.float() + eps)).clamp(max=1.0)
        torch._foreach_mul_(tensors, coef.to(tensors[0].device))
    return global_norm


def has_overflow_serial(self, params) -> bool:
    """True if any gradient holds an inf or a NaN (DeepSpeed's CheckOverflow contract), one host read."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return False
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    flags = [torch.stack(torch._foreach_norm(ts, float("inf"))).float().isfinite().all() for ts in by_dtype.values()]
    return not bool(torch.stack(flags).all())


def install() -> None:
    """Route DeepSpeed's bf16/fp16 optimizers (and its utils) through the functions above."""
    for module in (ds_utils, bf16_optimizer):
        module.get_global_norm_of_tensors = global_norm
        module.clip_tensors_by_global_norm = clip_by_global_norm
    ds_utils.CheckOverflow.has_overflow_serial = has_overflow_serial
