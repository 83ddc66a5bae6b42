"""DeepSpeed's ZeRO-0 bf16/fp16 optimizer step in a handful of multi-tensor ops and one host read.

With torch's AdamW (train.py's default), DeepSpeed 0.19 wraps a bf16 or fp16 model without ZeRO in
`FP16_UnfusedOptimizer`. Its step walks the parameter tensors five times in Python: an overflow check,
a per-tensor norm (cast, norm, square, add), a cast of each gradient to its fp32 master, a multiply for
clipping, and a copy of each master back into the model; it reads the norm back on the host before
the optimizer runs. For BERT-large's 394 tensors that is ~2,400 kernels (counted on CPU): 30.5 ms a step
on one H100 (the engine profile's ZeRO-0 `step_ms`, session 21; 55.5 on the 2026-11-25 one, 44 on one H200),
up to two thirds of a graphed step at a quarter of the anchor batch, and its host time changed from process
to process (30-52 ms on one H200, session 20). With `step` below: 11.0 ms on that H100, 29 ops however many
tensors.

`step` below computes the same update: the gradients are cast into one flat fp32 buffer whose views
become the masters' `.grad` (one `_foreach_copy_`), the norm is one reduction over that buffer,
clipping one multiply by a coefficient computed on the device, the model copy one `_foreach_copy_`.
The skip decision (an inf/NaN gradient makes the norm non-finite, which is what DeepSpeed skips on) is
read back once, after the whole step has been queued; a fused torch optimizer skips on the device
through its `found_inf` argument, so nothing waits before that read. The flat buffer holds 4 bytes per
parameter, as DeepSpeed's per-tensor fp32 gradients do, so the step's memory is unchanged.

Only the plain case takes this path: one model-parallel rank (DeepSpeed's norm has its own rules for
TP/PP-replicated tensors), no MoE parameters, no legacy fused LAMB. Anything else runs DeepSpeed's step.
"""
from __future__ import annotations

import torch
from deepspeed.moe.utils import is_moe_param
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

_ORIGINAL_STEP = FP16_UnfusedOptimizer.step
CLIP_EPS = 1e-6                       # DeepSpeed's unscale_and_clip_grads: (norm / scale + 1e-6) / clip


def eligible(opt: FP16_UnfusedOptimizer) -> bool:
    """Whether `step` computes exactly what DeepSpeed's step would for this optimizer (cached per optimizer)."""
    ok = getattr(opt, "_fast_step_ok", None)
    if ok is None:
        mpu = opt.mpu
        ok = (not opt.fused_lamb_legacy
              and (mpu is None or mpu.get_model_parallel_world_size() == 1)
              and not any(is_moe_param(p) or getattr(p, PIPE_REPLICATED, False)
                          for group in opt.fp16_groups for p in group))
        opt._fast_step_ok = ok
    return ok


def _flat_grads(group: list[torch.nn.Parameter], masters: list[torch.Tensor]) -> torch.Tensor:
    """The group's gradients cast into one new fp32 buffer whose views become the masters' gradients
    (zeros where a parameter has none, as DeepSpeed fills them)."""
    flat = torch.empty(sum(m.numel() for m in masters), dtype=masters[0].dtype, device=masters[0].device)
    views = [v.view_as(m) for v, m in zip(flat.split([m.numel() for m in masters]), masters)]
    have = [(v, p.grad) for v, p in zip(views, group) if p.grad is not None]
    if have:
        torch._foreach_copy_([v for v, _ in have], [g for _, g in have])
    if len(have) < len(views):
        torch._foreach_zero_([v for v, p in zip(views, group) if p.grad is None])
    for m, v in zip(masters, views):
        m.grad = v
    return flat


def step(self: FP16_UnfusedOptimizer, closure=None) -> bool:
    """FP16_UnfusedOptimizer.step with the same result (see the module docstring); returns the overflow flag."""
    if closure is not None or not eligible(self):
        return _ORIGINAL_STEP(self, closure)
    groups = [(g, m) for g, m in zip(self.fp16_groups, self.fp32_groups) if g]
    if not groups:
        return _ORIGINAL_STEP(self, closure)
    flats = [_flat_grads(group, masters) for group, masters in groups]
    sq = torch.stack([torch.linalg.vector_norm(f, dtype=torch.float32) for f in flats]).square().sum()
    norm = sq.sqrt()                                  # of the loss-scaled gradients, as DeepSpeed's norm
    bad = ~torch.isfinite(norm)
    scale = self.loss_scale_config.cur_scale
    # DeepSpeed divides by max(scale, scale * (norm / scale + eps) / clip); exactly 1 / scale when not clipping
    coef = torch.full((), 1.0 / scale, dtype=torch.float32, device=norm.device)
    if self.clip_grad > 0:
        clip = (norm / scale + CLIP_EPS) / self.clip_grad
        coef = torch.where(clip > 1, 1.0 / (clip * scale), coef)
    torch._foreach_mul_(flats, coef)
    fused = all(g.get("fused") for g in self.optimizer.param_groups)
    if fused:                                         # the optimizer skips on the device; read the flag last
        self.optimizer.found_inf = bad.float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        _copy_to_model(groups)
        overflow = bool(bad)
    else:
        overflow = bool(bad)
        if not overflow:
            self.optimizer.step()
            _copy_to_model(groups)
    if overflow:
        return self._skip_invalid_grad_norm()
    self.overflow = False
    self._global_grad_norm = float(norm)              # already computed: the read above waited for it
    self._update_scale(False)
    for _, masters in groups:
        for m in masters:
            m.grad = None
    return self.overflow


def _copy_to_model(groups) -> None:
    """Each fp32 master into its bf16/fp16 model parameter (through .data, as DeepSpeed copies)."""
    with torch.no_grad():
        for group, masters in groups:
            torch._foreach_copy_([p.data for p in group], masters)


def install() -> None:
    """Route DeepSpeed's FP16_UnfusedOptimizer (its ZeRO-0 bf16/fp16 wrapper of torch optimizers) through `step`."""
    FP16_UnfusedOptimizer.step = step
