"""Saved-tensor accounting (what the model profiler measures activations with) against sizes worked out
by hand from what each autograd op keeps, for a small MLP and an attention block (fp32, no dropout)."""
from __future__ import annotations

import torch
from torch import nn

from autotune.profile_model import per_sample, saved_bytes
from model_zoo.accounting import saved_tensor_bytes

B, S, H, F, HEADS = 3, 10, 16, 40, 4
FP32 = 4


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(H, F), nn.GELU(), nn.Linear(F, H)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Plain (non-SDPA) multi-head attention so that what is saved does not depend on a kernel choice."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        d = H // HEADS

        def heads(t):
            return t.view(b, s, HEADS, d).transpose(1, 2).contiguous()

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        probs = torch.softmax((q * d ** -0.5) @ k.transpose(-2, -1), dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, H)
        return self.o(ctx)


def _x(batch: int = B) -> torch.Tensor:
    return torch.randn(batch, S, H, requires_grad=True)


def test_mlp_by_hand():
    # fc1 keeps its input x (B*S*H); GELU keeps its input, fc1's output (B*S*F); fc2 keeps its input,
    # GELU's output (B*S*F). Weights are parameters, not activations.
    expected = FP32 * B * S * (H + 2 * F)
    m = MLP()
    assert saved_tensor_bytes(m, _x()) == expected
    assert saved_bytes(m, (_x(),), (), ckpt=False) == expected


def test_attention_by_hand():
    # q/k/v projections share their input x (kept once: B*S*H); the score matmul keeps the scaled q and
    # the contiguous k (2*B*S*H); softmax keeps its output, the probabilities (B*HEADS*S*S), which the
    # second matmul keeps too, with v (B*S*H); the output projection keeps its input (B*S*H).
    expected = FP32 * (5 * B * S * H + B * HEADS * S * S)
    m = Attention()
    assert saved_tensor_bytes(m, _x()) == expected
    assert saved_bytes(m, (_x(),), (), ckpt=False) == expected


def test_checkpointed_layer_keeps_only_its_input():
    for m in (MLP(), Attention()):
        assert saved_bytes(m, (_x(),), (), ckpt=True) == FP32 * B * S * H


def test_per_sample_slope_separates_a_fixed_table():
    m = Attention()
    b1, b2 = 2, 5
    v1, v2 = saved_bytes(m, (_x(b1),), (), False), saved_bytes(m, (_x(b2),), (), False)
    per, fixed = per_sample(b1, v1, b2, v2)
    assert per == FP32 * (5 * S * H + HEADS * S * S) and fixed == 0
    assert per_sample(1, 100 + 7, 3, 300 + 7) == (100, 7)
