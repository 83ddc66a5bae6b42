"""Pieces the family adapters share: deterministic generators, loss helpers, FLOPs."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}   # plan precision -> dtype


def batch_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for the global batch of `step`: a function of (seed, step) only."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


def record_label(record: dict) -> int | float:
    for key in ("labels", "label"):
        if key in record:
            return record[key]
    raise KeyError(f"record has no 'label' or 'labels' field (fields: {', '.join(record)})")


def classification_loss(num_labels: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """HF's sequence/image classification loss: MSE for one label, cross entropy otherwise."""

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float().view(-1, num_labels), labels.view(-1))

    return loss_fn


def encoder_layer_flops(seq: int, hidden: int, ffn: int, kv_seq: int | None = None) -> float:
    """Forward FLOPs of one self-attention + MLP layer per sample (2 per multiply-add)."""
    kv = seq if kv_seq is None else kv_seq
    proj = 2 * seq * hidden * hidden * 4          # q, k, v, out
    attn = 2 * seq * kv * hidden * 2              # scores and weighted sum
    mlp = 2 * seq * hidden * ffn * 2
    return float(proj + attn + mlp)
