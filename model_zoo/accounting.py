"""Activation memory kept for backward: a measurement and the analytic pieces the family specs use.

`saved_tensor_bytes` / `saved_tensors` measure what autograd *saves* (via `saved_tensors_hooks`), not
what the allocator holds, so they work the same on CPU and CUDA (not on the meta device: its storages
have no addresses). The activation-accounting tests use them to check model_zoo/<family>/spec.py, and
the model profiler can reuse them. The rest of this file holds the shared formulas (LayerNorm, SDPA
kernels, dropout masks, TP split) so that every family counts the same piece the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from model_zoo.base import pow2_upto


@dataclass(frozen=True)
class SavedStorage:
    """One distinct storage kept for backward (several saved views of it count once)."""

    nbytes: int
    shape: tuple[int, ...]   # shape of the first saved tensor that referred to it
    dtype: torch.dtype
    key: tuple[str, int]     # (device, storage address): _storage_key


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _excluded_keys(fn: Callable, exclude: Iterable[torch.Tensor]) -> set[tuple[str, int]]:
    """Parameters and buffers of `fn` (if it is a module) plus `exclude`: weights are not activations."""
    tensors: list[torch.Tensor] = list(exclude)
    if isinstance(fn, torch.nn.Module):
        tensors += list(fn.parameters()) + list(fn.buffers())
    return {_storage_key(t) for t in tensors if isinstance(t, torch.Tensor)}


def saved_tensors(fn: Callable, *args: Any, exclude: Iterable[torch.Tensor] = (), **kwargs: Any
                  ) -> tuple[list[SavedStorage], Any]:
    """Run `fn(*args, **kwargs)` and list the distinct storages autograd saved for backward.

    Storages of `exclude` and of a module's own parameters/buffers are skipped. Every saved tensor is
    kept referenced until the forward returns so that a freed storage's address cannot be reused and
    miscounted. Returns (storages, fn's return value).

    The hook packs a detached alias, never the tensor itself: a saved *output* would then refer to its
    own grad_fn through the hook, a cycle Python's gc cannot see, and the graph (with every activation)
    would stay in memory after the return value is dropped.
    """
    skip = _excluded_keys(fn, exclude)
    found: dict[tuple[str, int], SavedStorage] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in skip and key not in found:
            found[key] = SavedStorage(t.untyped_storage().nbytes(), tuple(t.shape), t.dtype, key)
            keep.append(t)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    keep.clear()
    return list(found.values()), out


def saved_tensor_bytes(fn: Callable, *args: Any, exclude: Iterable[torch.Tensor] = (), **kwargs: Any) -> int:
    """Bytes autograd keeps for backward when running `fn(*args, **kwargs)` (each storage once)."""
    storages, _ = saved_tensors(fn, *args, exclude=exclude, **kwargs)
    return sum(s.nbytes for s in storages)


# ---------------------------------------------------------------------------------------------------
# Analytic building blocks: bytes saved for backward per sample by the pieces HF layers are made of.
# Shared by the family specs so that every family counts a LayerNorm or an attention call the same way.
# ---------------------------------------------------------------------------------------------------

FP32 = 4    # LayerNorm mean/rstd, T5 RMS statistics and SDPA log-sum-exp are fp32 at every precision
INT64 = 8   # token ids kept by embedding lookups and losses

# Extra tensors of the FFN width an activation function saves, besides its output (its output is always
# saved by the next Linear): gelu/silu save their input; relu saves only its output; HF's python
# "gelu_new" (T5 v1.1) saves input, tanh output, 0.5*x and 1+tanh (4 tensors).
ACTIVATION_EXTRA_SAVES = {"relu": 0, "gelu": 1, "gelu_pytorch_tanh": 1, "silu": 1, "swish": 1, "gelu_new": 4}

@dataclass
class ActTally:
    """Bytes per sample saved for backward, split into what Megatron TP replicates and what it shards.

    TP assumption (Megatron, no sequence parallelism): column-parallel QKV/fc1 and everything up to the
    row-parallel proj/fc2 input is split across the TP ranks; layer inputs, norms, residuals and the
    dropouts after the all-reduce are replicated on every rank.
    """

    replicated: int = 0
    sharded: int = 0

    def add(self, nbytes: int, sharded: bool = False) -> None:
        if sharded:
            self.sharded += nbytes
        else:
            self.replicated += nbytes

    def at_tp(self, tp: int) -> int:
        return self.replicated + -(-self.sharded // tp)


def activation_extra_saves(name: str) -> int:
    """FFN-width tensors saved by activation `name` besides its output (ValueError if not modelled)."""
    if name not in ACTIVATION_EXTRA_SAVES:
        raise ValueError(f"activation '{name}' is not modelled: supported {', '.join(ACTIVATION_EXTRA_SAVES)}")
    return ACTIVATION_EXTRA_SAVES[name]


def dropout_mask_bytes(device: str, act: int) -> int:
    """Bytes per element of a saved dropout mask: CUDA's fused dropout keeps a bool mask, CPU a scaled float one."""
    return 1 if device == "cuda" else act


def layernorm_bytes(tokens: int, width: int, act: int, device: str) -> int:
    """nn.LayerNorm saves its input and mean + rstd per token (fp32 on CUDA; the input dtype on CPU)."""
    return tokens * width * act + 2 * tokens * (FP32 if device == "cuda" else act)


def sdpa_kernel(device: str, precision: str, bias_requires_grad: bool, dropout: float = 0.0) -> str:
    """The kernel torch's scaled_dot_product_attention picks for HF's call (as seen with torch 2.11-2.13).

    CPU: its flash kernel unless an additive mask needs a gradient (T5 position bias, Swin relative
    position bias) or attention dropout is on, which only the math kernel supports. CUDA:
    memory-efficient for fp32 or a mask that needs a gradient; otherwise flash, or cuDNN when a mask is
    given (both keep the same tensors).
    """
    if device == "cpu":
        return "math" if bias_requires_grad or dropout > 0 else "flash"
    return "efficient" if bias_requires_grad or precision == "fp32" else "flash"


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# The CUDA memory-efficient SDPA kernel wants a mask whose strides (all but the last, which must be 1)
# are multiples of 8 elements; otherwise it keeps a copy whose last dimension L is padded by 8 - L % 8,
# a full 8 when L is already a multiple (seen for bf16 and fp32 on H100, torch 2.11: 49 -> 56, 16 -> 24).
MEM_EFF_BIAS_ALIGN = 8
# CUDA's fused SDPA kernels keep a philox seed and offset (two int64 scalars) per call for backward.
SDPA_RNG_STATE_BYTES = 16


def sdpa_fixed_bytes(device: str) -> int:
    """Bytes one attention call saves per micro-batch whatever its size (RNG state on CUDA, none on CPU)."""
    return SDPA_RNG_STATE_BYTES if device == "cuda" else 0


def efficient_mask_last_dim(kv_len: int, stride_aligned: bool = True) -> int:
    """Last dimension of the mask the memory-efficient kernel keeps (see MEM_EFF_BIAS_ALIGN).

    `stride_aligned`: the mask's layout is dense with the key dimension innermost; False for single-head
    masks made by permuting a (..., heads=1) tensor, whose size-1 dims keep stride 1 (T5, Swin at one
    head per TP rank).
    """
    if stride_aligned and kv_len % MEM_EFF_BIAS_ALIGN == 0:
        return kv_len
    return kv_len + MEM_EFF_BIAS_ALIGN - kv_len % MEM_EFF_BIAS_ALIGN


def efficient_bias_bytes(heads: int, q_len: int, kv_len: int, act: int, stride_aligned: bool = True) -> int:
    """Bytes of a mask (no batch dimension) the memory-efficient kernel keeps."""
    return heads * q_len * efficient_mask_last_dim(kv_len, stride_aligned) * act


def sdpa_bytes(kernel: str, q_len: int, kv_len: int, heads: int, head_dim: int, act: int, groups: int = 1,
               mask_last_dim: int = 0, dropout: float = 0.0) -> int:
    """Bytes per sample saved by one attention call incl. the projection outputs it consumes.

    Counts q, k, v (the projection outputs, or the math kernel's scaled copies) and the attention output
    (which is the output projection's saved input). The math kernel (used here on CPU only) adds the
    softmax probabilities, and on CPU computes q, k, v and probabilities in fp32 whatever the input
    dtype; the fused kernels add an fp32 log-sum-exp per query (the memory-efficient one pads it to 32
    queries). Attention dropout costs the fused kernels nothing (they regenerate it from the RNG state);
    the math kernel keeps its fp32 mask and the dropped probabilities.
    `groups` is the number of independent attention problems per sample (Swin: windows).
    `mask_last_dim` > 0: the memory-efficient kernel also keeps a per-sample additive mask with that
    (padded, see efficient_mask_last_dim) last dimension (Swin's shifted-window mask has a batch dim).
    """
    qkvo = (2 * q_len + 2 * kv_len) * heads * head_dim * act
    if kernel == "math":
        qkvo = (q_len + 2 * kv_len) * heads * head_dim * FP32 + q_len * heads * head_dim * act
        extra = heads * q_len * kv_len * FP32 * (3 if dropout > 0 else 1)
    elif kernel == "flash":
        extra = heads * q_len * FP32
    elif kernel == "efficient":
        extra = heads * round_up(q_len, 32) * FP32
        extra += heads * q_len * mask_last_dim * act
    else:
        raise ValueError(f"unknown SDPA kernel '{kernel}'")
    return groups * (qkvo + extra)


MAX_TP = 64  # largest TP / vocab-TP degree described (powers of two up to it)


def tp_degrees(heads: int, *widths: int, max_tp: int = MAX_TP) -> list[int]:
    """Powers of two up to max_tp that divide the heads and every sharded width (Megatron needs all)."""
    out, tp = [], 1
    while tp <= max_tp:
        if heads % tp == 0 and all(w % tp == 0 for w in widths):
            out.append(tp)
        tp *= 2
    return out


def vtp_degrees(max_tp: int = MAX_TP) -> list[int]:
    """Vocab-TP degrees the OtherModules tables are given for (any power of two: the vocab is padded)."""
    return pow2_upto(max_tp)
