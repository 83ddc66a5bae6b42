"""backends/deepspeed/fast_clip.py against DeepSpeed's own per-tensor norm and clipping."""
from __future__ import annotations

import math

import pytest
import torch

from backends.deepspeed import fast_clip


def _tensors(scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), (3, 4, 2), (1,)]
    return [torch.randn(s, generator=g) * scale for s in shapes]


def test_norm_equals_deepspeed_and_hand_computed():
    ts = _tensors(1.0)
    ours = fast_clip.global_norm(ts)
    theirs = fast_clip._ORIGINAL_NORM(ts)
    by_hand = math.sqrt(sum(float((t.double() ** 2).sum()) for t in ts))
    assert float(ours) == pytest.approx(by_hand, rel=1e-6)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)


@pytest.mark.parametrize("scale", [0.01, 10.0])      # below and above max_norm=1
def test_clip_equals_deepspeed(scale):
    ours, theirs = _tensors(scale), _tensors(scale)
    n1 = fast_clip.clip_by_global_norm(ours, max_norm=1.0, global_norm=fast_clip.global_norm(ours))
    n2 = fast_clip._ORIGINAL_CLIP(theirs, max_norm=1.0, global_norm=fast_clip._ORIGINAL_NORM(theirs))
    assert float(n1) == pytest.approx(float(n2), rel=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    after = math.sqrt(sum(float((t.double() ** 2).sum()) for t in ours))
    assert after == pytest.approx(min(1.0, float(n2)), rel=1e-5)


def test_non_finite_norm_is_flagged_like_deepspeed():
    ts = _tensors(1.0)
    ts[1][3] = float("inf")
    assert float(fast_clip.global_norm(ts)) == -1.0 == float(fast_clip._ORIGINAL_NORM(ts))


def test_installed_into_deepspeed_bf16_optimizer():
    from deepspeed.runtime import bf16_optimizer

    import backends.deepspeed.engine  # noqa: F401  (installs on import)
    assert bf16_optimizer.get_global_norm_of_tensors is fast_clip.global_norm
    assert bf16_optimizer.clip_tensors_by_global_norm is fast_clip.clip_by_global_norm


@pytest.mark.parametrize("bad", [None, float("inf"), float("-inf"), float("nan")])
def test_overflow_check_equals_deepspeed(bad):
    params = [torch.nn.Parameter(t.to(torch.bfloat16) if t.dim() == 1 else t) for t in _tensors(1.0)]
    params.append(torch.nn.Parameter(torch.zeros(3)))          # no gradient: skipped
    for p, g in zip(params, _tensors(3.0)):
        p.grad = g.to(p.dtype)
    if bad is not None:
        params[2].grad[1, 2, 0] = bad
    expected = bad is not None
    from deepspeed.runtime.utils import CheckOverflow

    checker = CheckOverflow()
    assert fast_clip.has_overflow_serial(checker, params) is expected
    assert fast_clip._ORIGINAL_OVERFLOW(checker, params) is expected      # DeepSpeed's per-tensor check agrees


def test_overflow_check_installed():
    from deepspeed.runtime.utils import CheckOverflow

    import backends.deepspeed.engine  # noqa: F401  (installs on import)
    assert CheckOverflow.has_overflow_serial is fast_clip.has_overflow_serial




class _ZeroLike:
    """The attributes DeepSpeedZeroOptimizer's overflow check and norm read, over one data-parallel rank."""

    def __init__(self, grads: list[torch.Tensor], params: list[torch.nn.Parameter]):
        from deepspeed.runtime.utils import has_inf_or_nan

        self.bit16_groups, self.averaged_gradients = [params], {0: grads}
        self.model_parallel_rank, self.dp_process_group, self.device = 0, None, torch.device("cpu")
        self._has_inf_or_nan = has_inf_or_nan

    def _model_parallel_all_reduce(self, tensor, op):
        pass


def _zero_case(bad=None, padded=False):
    grads = [t.to(torch.bfloat16) if t.dim() == 1 else t for t in _tensors(3.0)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    if bad is not None:
        grads[2][1, 2, 0] = bad
    if padded:                      # DeepSpeed's alignment padding of a partition: not part of the norm
        pad = torch.full((5,), 100.0)
        pad._zero_padding = True
        grads.insert(0, pad)
    params[1].ds_pipe_replicated = True              # a pipeline-replicated copy: counted once elsewhere
    return _ZeroLike(grads, params), grads, params


@pytest.mark.parametrize("bad", [None, float("inf"), float("nan")])
def test_zero_overflow_equals_deepspeed(ds_world, bad):
    zero, _, _ = _zero_case(bad)
    ours, theirs = fast_clip.zero_overflow(zero), fast_clip._ORIGINAL_ZERO_OVERFLOW(zero)
    assert ours.shape == theirs.shape == (1,)
    assert bool(ours) is bool(theirs) is (bad is not None)


@pytest.mark.parametrize("padded", [False, True])
def test_zero_grad_norm_equals_deepspeed_and_hand_computed(ds_world, padded):
    zero, grads, params = _zero_case(padded=padded)
    real = [g for g in grads if not getattr(g, "_zero_padding", False)]
    by_hand = math.sqrt(sum(float((g.double() ** 2).sum()) for i, g in enumerate(real) if i != 1))
    ours = fast_clip.zero_grad_norm(zero, grads, params)
    theirs = fast_clip._ORIGINAL_ZERO_NORM(zero, grads, params)
    assert float(ours) == pytest.approx(by_hand, rel=1e-6)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    zero_bad, grads_bad, params_bad = _zero_case(bad=float("inf"))
    assert float(fast_clip.zero_grad_norm(zero_bad, grads_bad, params_bad)) == -1.0


def test_zero_checks_installed():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    import backends.deepspeed.engine  # noqa: F401  (installs on import)
    assert DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial is fast_clip.zero_overflow
    assert DeepSpeedZeroOptimizer.get_grad_norm_direct is fast_clip.zero_grad_norm
