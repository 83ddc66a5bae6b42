"""Reusable tensor-parallel pieces for converting Hugging Face modules (all families use these).

Every parallel layer is a Megatron-core layer built with an explicit `tp_group` and filled with its
shard of the *full* HF weight it replaces, so a converted model starts from exactly the weights of
the unconverted one. The wrappers return a plain tensor (Megatron's layers return (output, bias)),
which lets them drop into HF modules where an nn.Linear was.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from torch import nn

from model_zoo.base import IGNORE_INDEX, pad_vocab


def mp_config(dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    """Layers are allocated on CPU and not initialised: the weights are copied in from the HF model."""
    return ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False, params_dtype=dtype)


def _shard(t: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    return t.chunk(group.size(), dim=dim)[group.rank()]


def mark_sharded(param: torch.Tensor, dim: int) -> None:
    """Tag a TP-split parameter the way Megatron does (`tensor_model_parallel`, `partition_dim`).

    Gradient-norm code (Megatron's and DeepSpeed's) counts a tagged parameter on every TP rank and
    an untagged one on TP rank 0 only; the layers skip tagging when they do not initialise weights.
    """
    set_tensor_model_parallel_attributes(param, True, dim, 1)


class ColumnLinear(ColumnParallelLinear):
    """y = x A^T + b with A split by output rows: this rank computes its slice of the outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class RowLinear(RowParallelLinear):
    """y = x A^T + b with A split by input columns; partial products are summed over the TP group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


def column_parallel(linear: nn.Linear, group: Any, gather_output: bool = False) -> ColumnLinear:
    """ColumnParallelLinear holding this rank's rows of `linear` (outputs split, e.g. by attention head)."""
    out_f, in_f = linear.weight.shape
    if out_f % group.size():
        raise ValueError(f"output size {out_f} is not divisible by TP degree {group.size()}")
    layer = ColumnLinear(in_f, out_f, config=mp_config(linear.weight.dtype), init_method=nn.init.zeros_,
                         bias=linear.bias is not None, gather_output=gather_output, tp_group=group)
    with torch.no_grad():
        layer.weight.copy_(_shard(linear.weight, 0, group))
        if linear.bias is not None:
            layer.bias.copy_(_shard(linear.bias, 0, group))
    mark_sharded(layer.weight, 0)
    return layer


def row_parallel(linear: nn.Linear, group: Any) -> RowLinear:
    """RowParallelLinear holding this rank's columns of `linear`; the bias is kept whole (added once)."""
    out_f, in_f = linear.weight.shape
    if in_f % group.size():
        raise ValueError(f"input size {in_f} is not divisible by TP degree {group.size()}")
    layer = RowLinear(in_f, out_f, config=mp_config(linear.weight.dtype), init_method=nn.init.zeros_,
                      bias=linear.bias is not None, input_is_parallel=True, skip_bias_add=False, tp_group=group)
    with torch.no_grad():
        layer.weight.copy_(_shard(linear.weight, 1, group))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    mark_sharded(layer.weight, 1)
    return layer


class VocabEmbedding(VocabParallelEmbedding):
    """VocabParallelEmbedding over a padded vocabulary that keeps nn.Embedding's `padding_idx` (no gradient)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group: Any, vocab_size: int,
                 padding_idx: int | None, dtype: torch.dtype):
        super().__init__(num_embeddings, embedding_dim, init_method=nn.init.zeros_, config=mp_config(dtype),
                         tp_group=group)
        self.vocab_size = vocab_size          # real (unpadded) vocabulary
        self.padding_idx = padding_idx

    def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
        local = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        pad = None
        if self.padding_idx is not None and self.vocab_start_index <= self.padding_idx < self.vocab_end_index:
            pad = self.padding_idx - self.vocab_start_index
        out = F.embedding(local, self.weight, padding_idx=pad)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)


def vocab_parallel_embedding(emb: nn.Module, group: Any) -> VocabEmbedding:
    """Shard an nn.Embedding (or an untied [vocab, hidden] decoder nn.Linear) by vocabulary rows.

    The vocabulary is padded with zero rows to a multiple of TP (as Megatron does).
    """
    vocab, hidden = emb.weight.shape
    padded = pad_vocab(vocab, group.size())
    layer = VocabEmbedding(padded, hidden, group=group, vocab_size=vocab, padding_idx=getattr(emb, "padding_idx", None),
                           dtype=emb.weight.dtype)
    full = torch.zeros(padded, hidden, dtype=emb.weight.dtype)
    full[:vocab] = emb.weight.detach()
    with torch.no_grad():
        layer.weight.copy_(_shard(full, 0, group))
    mark_sharded(layer.weight, 0)
    return layer


def vocab_parallel_bias(bias: torch.Tensor, group: Any) -> nn.Parameter:
    """This rank's slice of an output bias over the padded vocabulary (padding entries are zero)."""
    padded = pad_vocab(bias.numel(), group.size())
    full = torch.zeros(padded, dtype=bias.dtype)
    full[: bias.numel()] = bias.detach()
    param = nn.Parameter(_shard(full, 0, group).clone())
    mark_sharded(param, 0)
    return param


def vocab_parallel_logits(hidden: torch.Tensor, embedding: VocabEmbedding, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits for this rank's vocabulary slice from tied embedding weights; padded columns are masked.

    The hidden state is identical on all TP ranks, so its gradient is summed over the group
    (Megatron's copy_to_tensor_model_parallel_region); padded vocabulary columns get the most
    negative value, so their softmax is exactly 0 and the loss is that of the unpadded vocabulary.
    """
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    x = copy_to_tensor_model_parallel_region(hidden, group=embedding.tp_group)
    logits = F.linear(x, embedding.weight, bias)
    n_real = embedding.vocab_size - embedding.vocab_start_index
    if n_real < logits.size(-1):
        keep = torch.arange(logits.size(-1), device=logits.device) < n_real
        logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
    return logits


class _VocabParallelCE(torch.autograd.Function):
    """Megatron's vocab-parallel cross entropy with an explicit group (its own uses the global TP group)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group: Any) -> torch.Tensor:
        work = logits.float()
        if work.data_ptr() == logits.data_ptr():
            work = work.clone()                       # Megatron's helpers work in place
        work, logits_max = VocabParallelCrossEntropy.calculate_logits_max(work)
        torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=group)
        vocab_end = vocab_start + work.size(-1)
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = \
            VocabParallelCrossEntropy.calculate_predicted_logits(work, target, logits_max, vocab_start, vocab_end)
        torch.distributed.all_reduce(predicted, group=group)
        torch.distributed.all_reduce(sum_exp, group=group)
        softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = \
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
        grad = VocabParallelCrossEntropy.calculate_gradients(grad_2d, arange_1d, masked_target_1d, update,
                                                             grad_input, grad_output)
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group: Any,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross entropy over labels != ignore_index, with the vocabulary split over `group`."""
    valid = labels != ignore_index
    target = labels.masked_fill(~valid, 0)
    per_token = _VocabParallelCE.apply(logits, target, vocab_start, group)
    valid_f = valid.to(per_token.dtype)
    return (per_token * valid_f).sum() / valid_f.sum().clamp(min=1.0)


def heads_per_partition(num_heads: int, group: Any, what: str = "attention") -> int:
    if num_heads % group.size():
        raise ValueError(f"{what} has {num_heads} heads, not divisible by TP degree {group.size()}; "
                         f"pick a TP degree that divides {num_heads}")
    return num_heads // group.size()


def fork_rng_in_forward(module: nn.Module) -> nn.Module:
    """Run `module.forward` under the model-parallel RNG (dropout on TP-partitioned activations).

    The module's class is swapped for a subclass whose forward forks the tracker, so parameter names
    and state-dict keys are unchanged (the same trick as torch FSDP2's `fully_shard`).
    """
    from backends.megatron.random import MODEL_PARALLEL_RNG, get_rng_tracker

    cls = module.__class__
    if getattr(cls, "_forks_model_parallel_rng", False):
        return module

    def forward(self, *args, **kwargs):
        with get_rng_tracker().fork(MODEL_PARALLEL_RNG):
            return cls.forward(self, *args, **kwargs)

    module.__class__ = type(f"TP{cls.__name__}", (cls,), {"forward": forward, "_forks_model_parallel_rng": True})
    return module
