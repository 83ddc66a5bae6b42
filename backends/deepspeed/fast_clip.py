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

The overflow check of DeepSpeed's bf16/fp16 stage-0 optimizers (`FP16_UnfusedOptimizer`, which DeepSpeed
picks for ZeRO stage 0 around torch's AdamW, and `FP16_Optimizer`) sums every gradient in fp32 and reads
each sum back on the host, one synchronisation per tensor; `has_overflow_serial` below takes one max-abs
per tensor with `torch._foreach_norm(inf)` and reads back one flag. (The unfused optimizer's whole step
is replaced in the plain case: backends/deepspeed/fast_step.py.)

ZeRO-1/2's `DeepSpeedZeroOptimizer` (ZeRO-2 with bf16 on one device, ZeRO-1/2 with fp16) tests each
gradient of its partition for inf/NaN with a max and a min (ten kernels a tensor) and takes each
tensor's norm after an fp64 copy of it: ~8,300 dispatched ops in a ZeRO-2 step of a BERT-large-shaped
model's 394 tensors on CPU. `zero_overflow` and `zero_grad_norm` below take one `torch._foreach_norm` each
(fp64 accumulation as DeepSpeed's, without the copies) and keep DeepSpeed's reductions over the data- and
model-parallel groups: ~2,400 ops, nearly all of them views and detaches (no kernel). On one H100 BERT-L's
ZeRO-2 step went from 38.9 to 6.1 ms (profiles/h100/runs/s21).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.runtime import bf16_optimizer
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.runtime.zero.utils import get_norm_dtype

_ORIGINAL_NORM = ds_utils.get_global_norm_of_tensors
_ORIGINAL_CLIP = ds_utils.clip_tensors_by_global_norm
_ORIGINAL_OVERFLOW = ds_utils.CheckOverflow.has_overflow_serial
_ORIGINAL_ZERO_OVERFLOW = DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial
_ORIGINAL_ZERO_NORM = DeepSpeedZeroOptimizer.get_grad_norm_direct


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
    return not bool(_all_finite(grads))


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A device bool: no tensor holds an inf or a NaN (a max-abs per tensor, one multi-tensor op per dtype)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    flags = [torch.stack(torch._foreach_norm(ts, float("inf"))).float().isfinite().all() for ts in by_dtype.values()]
    return torch.stack(flags).all()


def zero_overflow(self) -> torch.Tensor:
    """DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial: shape-[1] device bool, any inf/NaN."""
    grads = [g for i in range(len(self.bit16_groups)) for g in self.averaged_gradients[i] if g is not None]
    if not grads or any(g.is_sparse for g in grads):
        return _ORIGINAL_ZERO_OVERFLOW(self)
    return (~_all_finite([g.detach() for g in grads])).reshape(1)


def zero_grad_norm(self, gradients, params, norm_type=2):
    """DeepSpeedZeroOptimizer.get_grad_norm_direct for the L2 norm: the same tensors counted (no zero padding,
    no pipeline-replicated copies, model-parallel rank 0 or model-parallel parameters), summed in fp64 and
    over the data- and model-parallel groups; -1 if not finite."""
    if float(norm_type) != 2.0:
        return _ORIGINAL_ZERO_NORM(self, gradients, params, norm_type)
    grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
    keep = [g.detach() for g, p in zip(grads, params) if not getattr(p, PIPE_REPLICATED, False)
            and (ds_utils.is_model_parallel_parameter(p) or self.model_parallel_rank == 0)]
    if any(g.is_sparse for g in keep):
        return _ORIGINAL_ZERO_NORM(self, gradients, params, norm_type)
    if keep:
        total = torch.stack(torch._foreach_norm(keep, 2.0, dtype=get_norm_dtype())).pow(2).sum().float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.sqrt()
    ds_utils.mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def install() -> None:
    """Route DeepSpeed's bf16/fp16 optimizers (and its utils) through the functions above."""
    for module in (ds_utils, bf16_optimizer):
        module.get_global_norm_of_tensors = global_norm
        module.clip_tensors_by_global_norm = clip_by_global_norm
    ds_utils.CheckOverflow.has_overflow_serial = has_overflow_serial
    DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial = zero_overflow
    DeepSpeedZeroOptimizer.get_grad_norm_direct = zero_grad_norm
