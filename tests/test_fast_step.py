"""backends/deepspeed/fast_step.py against DeepSpeed's own FP16_UnfusedOptimizer.step, run side by side."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from backends.deepspeed import fast_step

SHAPES = [(64, 16), (16,), (3, 5, 4), (1,), (300,)]
NO_KERNEL = {"aten.view.default", "aten.detach.default", "aten.split_with_sizes.default", "aten.slice.Tensor",
             "aten.alias.default", "aten.lift_fresh.default", "aten._local_scalar_dense.default"}


def _optimizer(fused: bool, params: list[torch.nn.Parameter], mpu=None):
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    inner = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=fused)
    return FP16_UnfusedOptimizer(inner, low_precision_dtype=torch.bfloat16, clip_grad=1.0, mpu=mpu, verbose=False)


def _pair(fused: bool):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16)) for s in SHAPES]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return (params, _optimizer(fused, params)), (twins, _optimizer(fused, twins))


def _set_grads(params, scale: float, step: int, missing: int | None = None, bad: float | None = None) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i == missing else (torch.randn(p.shape, generator=g) * scale).to(torch.bfloat16)
    if bad is not None:
        params[2].grad[1, 2, 0] = bad


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("scale", [1e-3, 10.0])              # gradient norm below / above the clip of 1
def test_step_equals_deepspeed(ds_world, fused, scale):
    (ours, opt_a), (theirs, opt_b) = _pair(fused)
    for step in range(3):
        for params in (ours, theirs):
            _set_grads(params, scale, step, missing=3 if step == 1 else None)
        assert fast_step.step(opt_a) is False
        assert fast_step._ORIGINAL_STEP(opt_b) is False
        assert opt_a._global_grad_norm == pytest.approx(opt_b._global_grad_norm, rel=1e-5)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)            # the bf16 model weights
        for a, b in zip(opt_a.fp32_groups[0], opt_b.fp32_groups[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)      # the fp32 masters
            assert a.grad is None and b.grad is None
        for a, b in zip(opt_a.fp32_groups[0], opt_b.fp32_groups[0]):
            sa, sb = opt_a.optimizer.state[a], opt_b.optimizer.state[b]
            # DeepSpeed's constructor runs one step on zero gradients to create the state
            assert float(sa["step"]) == float(sb["step"]) == step + 2
            torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        for p in ours + theirs:
            p.grad = None


def test_clipped_update_is_the_clipped_gradient(ds_world):
    """Independent of DeepSpeed: with plain SGD the master moves by -lr * g * min(1, 1 / ||g||)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in SHAPES]
    opt = FP16_UnfusedOptimizer(torch.optim.SGD(params, lr=0.5), low_precision_dtype=torch.bfloat16,
                                clip_grad=1.0, verbose=False)
    _set_grads(params, 10.0, 0)
    grads = [p.grad.float() for p in params]
    norm = torch.cat([g.flatten() for g in grads]).double().norm().item()
    fast_step.step(opt)
    assert opt._global_grad_norm == pytest.approx(norm, rel=1e-6)
    for m, g in zip(opt.fp32_groups[0], grads):
        torch.testing.assert_close(m, -0.5 * g / (norm + 1e-6), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_skips_the_step_like_deepspeed(ds_world, fused, bad):
    (ours, opt_a), (theirs, opt_b) = _pair(fused)
    for params in (ours, theirs):                # one good step first, so there is optimizer state to keep
        _set_grads(params, 1.0, 0)
    fast_step.step(opt_a)
    fast_step._ORIGINAL_STEP(opt_b)
    before = [p.detach().clone() for p in ours]
    masters = [m.detach().clone() for m in opt_a.fp32_groups[0]]
    for params in (ours, theirs):
        _set_grads(params, 1.0, 1, bad=bad)
    assert fast_step.step(opt_a) is True
    assert fast_step._ORIGINAL_STEP(opt_b) is True
    assert opt_a._global_grad_norm == opt_b._global_grad_norm == float("inf")
    for p, q, b in zip(ours, theirs, before):
        torch.testing.assert_close(p, b, rtol=0, atol=0)
        torch.testing.assert_close(q, b, rtol=0, atol=0)
        assert p.grad is None
    for m, b in zip(opt_a.fp32_groups[0], masters):
        torch.testing.assert_close(m, b, rtol=0, atol=0)
        assert float(opt_a.optimizer.state[m]["step"]) == 2.0            # the skipped step is not counted
    assert not hasattr(opt_a.optimizer, "found_inf")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> int:
        return sum(n for op, n in self.seen.items() if op not in NO_KERNEL)


def _step_ops(shapes, original: bool) -> _Ops:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16)) for s in shapes]
    opt = _optimizer(True, params)
    _set_grads(params, 1.0, 0)
    with _Ops() as ops:
        (fast_step._ORIGINAL_STEP if original else fast_step.step)(opt)
    return ops


def test_step_launches_a_constant_number_of_kernels_and_reads_back_once(ds_world):
    n = len(SHAPES)
    fast, fast3 = _step_ops(SHAPES, False), _step_ops(SHAPES * 3, False)
    deepspeed, deepspeed3 = _step_ops(SHAPES, True), _step_ops(SHAPES * 3, True)
    # DeepSpeed: a cast, norm, square, add, clip multiply and copy per tensor; ours: none per tensor
    assert deepspeed3.kernels() - deepspeed.kernels() >= 5 * 2 * n
    assert fast3.kernels() == fast.kernels() <= 40
    assert fast.seen["aten._local_scalar_dense.default"] == 2         # the skip flag, then the norm it computed
    assert deepspeed.seen["aten._local_scalar_dense.default"] >= 2


def test_only_the_plain_case_takes_the_fast_path(ds_world):
    params = [torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
    assert fast_step.eligible(_optimizer(False, params))
    two_ranks = SimpleNamespace(get_model_parallel_world_size=lambda: 2)
    assert not fast_step.eligible(_optimizer(False, [torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))],
                                             mpu=two_ranks))
    replicated = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    replicated.ds_pipe_replicated = True
    assert not fast_step.eligible(_optimizer(False, [replicated]))


def _zero0_losses(monkeypatch, original: bool) -> tuple[list[float], object]:
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from tests.test_engine_modes import _bert_test_trainer, _close

    if original:
        monkeypatch.setattr(FP16_UnfusedOptimizer, "step", fast_step._ORIGINAL_STEP)
    trainer, data = _bert_test_trainer(from_state=True, global_bsz=4, chunks=2, precision="bf16", zero_stage=0)
    try:
        losses = [trainer.train_step(data.micro_batches(0)).loss for _ in range(4)]      # one batch: loss falls
        return losses, trainer.engine.optimizer
    finally:
        _close(trainer)


def test_runtime_zero0_engine_trains_as_with_deepspeeds_step(world_of_one, monkeypatch):
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    import backends.deepspeed.engine  # noqa: F401  (installs on import)
    assert FP16_UnfusedOptimizer.step is fast_step.step
    ours, opt = _zero0_losses(monkeypatch, original=False)
    assert isinstance(opt, FP16_UnfusedOptimizer) and opt._fast_step_ok
    theirs, _ = _zero0_losses(monkeypatch, original=True)
    assert ours == pytest.approx(theirs, rel=2e-3)
    assert ours[-1] < ours[0]                              # and it trains
