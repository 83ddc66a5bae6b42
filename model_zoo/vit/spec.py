"""ViT as the planner sees it: one layer type (HF ViTLayer, pre-LayerNorm) plus patch embedding and head.

Task: "image-classification" (ViTForImageClassification: final LayerNorm + linear classifier on the CLS
token). Tokens per sample = patches + 1 (CLS). Every number is per sample.
"""
from __future__ import annotations

import copy

import torch
from transformers import ViTConfig
from transformers.models.vit.modeling_vit import ViTLayer

from model_zoo.accounting import (FP32, INT64, ActTally, activation_extra_saves, dropout_mask_bytes, layernorm_bytes,
                                  sdpa_bytes, sdpa_fixed_bytes, sdpa_kernel, tp_degrees, vtp_degrees)
from model_zoo.base import PRECISION_BYTES, LayerType, ModelSpec, OtherModules

TASKS = ("image-classification",)


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def num_patches(config: ViTConfig) -> int:
    (ih, iw), (ph, pw) = _pair(config.image_size), _pair(config.patch_size)
    return (ih // ph) * (iw // pw)


def tokens(config: ViTConfig) -> int:
    """Tokens per image: patches plus the CLS token."""
    return num_patches(config) + 1


def _head_dim(config: ViTConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---------------------------------------------------------------------------------------------- layer
def layer_params(config: ViTConfig) -> int:
    """ViTLayer: Q, K, V (bias if qkv_bias), O (bias), 2 LayerNorms, fc1, fc2 (bias)."""
    H, F = config.hidden_size, config.intermediate_size
    inner = config.num_attention_heads * _head_dim(config)
    qkv_bias = inner if config.qkv_bias else 0
    return 3 * (H * inner + qkv_bias) + (inner * H + H) + 2 * 2 * H + (H * F + F) + (F * H + H)


def layer_flops(config: ViTConfig, S: int) -> float:
    """Projections 2*S*(4*H*inner + 2HF) plus attention 2 * 2*S^2*inner."""
    H, F = config.hidden_size, config.intermediate_size
    inner = config.num_attention_heads * _head_dim(config)
    return 2.0 * S * (4 * H * inner + 2 * H * F) + 4.0 * S * S * inner


def layer_act(config: ViTConfig, S: int, precision: str, device: str) -> ActTally:
    """Saved for backward by one ViTLayer (pre-LN), in forward order.

    LN1 input (the layer input) + stats | LN1 output (Q/K/V input) | attention (q, k, v, output, fp32
    log-sum-exp; SDPA without mask keeps no S x S matrix) | LN2 input (attn + residual) + stats | LN2
    output (fc1 input) | fc1 output (GELU input) | GELU output (fc2 input) | dropout masks if any.
    """
    H, F, h = config.hidden_size, config.intermediate_size, config.num_attention_heads
    a = PRECISION_BYTES[precision]
    t = ActTally()
    t.add(layernorm_bytes(S, H, a, device))
    t.add(S * H * a)
    p = config.attention_probs_dropout_prob
    kernel = sdpa_kernel(device, precision, bias_requires_grad=False, dropout=p)
    t.add(sdpa_bytes(kernel, S, S, h, _head_dim(config), a, dropout=p), sharded=True)
    t.add(layernorm_bytes(S, H, a, device))
    t.add(S * H * a)
    t.add((activation_extra_saves(config.hidden_act) + 1) * S * F * a, sharded=True)
    if config.hidden_dropout_prob > 0:
        t.add(2 * S * H * dropout_mask_bytes(device, a))                      # after attn proj and fc2
    return t


def layer_type(config: ViTConfig, precision: str, device: str) -> LayerType:
    H, F, h = config.hidden_size, config.intermediate_size, config.num_attention_heads
    S, a = tokens(config), PRECISION_BYTES[precision]
    act = layer_act(config, S, precision, device)
    return LayerType(
        name="vit_enc", count=config.num_hidden_layers, seq_len=S, hidden=H, heads=h, ffn_hidden=F,
        params=layer_params(config), fwd_flops=layer_flops(config, S),
        act_bytes={tp: act.at_tp(tp) for tp in tp_degrees(h, F)},
        ckpt_bytes=S * H * a, tp_allreduce_bytes=S * H * a, tp_allreduces_fwd=2, boundary_bytes=S * H * a,
        act_fixed_bytes={tp: sdpa_fixed_bytes(device) for tp in tp_degrees(h, F)})


# ---------------------------------------------------------------------------------------------- other
def embedding_params(config: ViTConfig) -> int:
    """Patch conv (weight + bias), CLS token, position embeddings (patches + 1)."""
    H = config.hidden_size
    ph, pw = _pair(config.patch_size)
    return (config.num_channels * ph * pw * H + H) + H + tokens(config) * H


def head_params(config: ViTConfig) -> int:
    """Final LayerNorm + classifier."""
    H, L = config.hidden_size, config.num_labels
    return 2 * H + H * L + L


def embedding_act(config: ViTConfig, a: int, device: str) -> int:
    """The patch conv keeps the pixels (for its weight gradient); dropout mask if any."""
    ih, iw = _pair(config.image_size)
    out = config.num_channels * ih * iw * a
    if config.hidden_dropout_prob > 0:
        out += tokens(config) * config.hidden_size * dropout_mask_bytes(device, a)
    return out


def head_act(config: ViTConfig, a: int, device: str) -> int:
    """Final LN input + stats | LN output (the classifier reads the CLS row of it) | fp32 log-probs | label."""
    S, H = tokens(config), config.hidden_size
    return layernorm_bytes(S, H, a, device) + S * H * a + config.num_labels * FP32 + INT64


def other_modules(config: ViTConfig, precision: str, device: str) -> OtherModules:
    a = PRECISION_BYTES[precision]
    H, L = config.hidden_size, config.num_labels
    ph, pw = _pair(config.patch_size)
    vtps = vtp_degrees()
    return OtherModules(
        params_first={v: embedding_params(config) for v in vtps},
        params_last={v: head_params(config) for v in vtps},
        tied_params={v: 0 for v in vtps},
        fwd_flops_first=2.0 * num_patches(config) * config.num_channels * ph * pw * H,
        fwd_flops_last=2.0 * H * L,
        act_bytes_first={v: embedding_act(config, a, device) for v in vtps},
        act_bytes_last={v: head_act(config, a, device) for v in vtps})


# ---------------------------------------------------------------------------------------------- API
def describe(config: ViTConfig, precision: str, seq_len: int | None = None, task: str = "image-classification", *,
             name: str = "", device: str = "cuda") -> ModelSpec:
    """ModelSpec of a ViT config; the token count comes from image and patch size (seq_len is ignored)."""
    if task not in TASKS:
        raise ValueError(f"task '{task}' is not supported for vit: use one of {', '.join(TASKS)}")
    lt = layer_type(config, precision, device)
    return ModelSpec(name=name or "vit", family="vit", precision=precision, layer_types=(lt,),
                     layer_order=(0,) * config.num_hidden_layers, other=other_modules(config, precision, device),
                     hf_config=config.to_dict(), task=task, seq_lens=(tokens(config),), act_device=device)


def make_layer(config: ViTConfig, type_index: int = 0) -> torch.nn.Module:
    """One HF ViTLayer (train mode, SDPA attention as HF models use by default)."""
    if type_index != 0:
        raise IndexError(f"vit has one layer type, not {type_index}")
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    return ViTLayer(config).train()


def tp_shard_config(config: ViTConfig, type_index: int, tp: int) -> ViTConfig:
    """The config whose ViTLayer is one Megatron TP rank's shard: heads / tp of the same size, FFN / tp."""
    if config.num_attention_heads % tp or config.intermediate_size % tp:
        raise ValueError(f"tp={tp} does not divide {config.num_attention_heads} heads and FFN "
                         f"{config.intermediate_size}: use a TP degree that does")
    config = copy.deepcopy(config)
    config.head_dim = _head_dim(config)
    config.num_attention_heads //= tp
    config.intermediate_size //= tp
    return config


def layer_inputs(config: ViTConfig, type_index: int, batch: int, device: torch.device | str, dtype: torch.dtype,
                 seq_len: int | None = None) -> tuple:
    """(hidden_states,) of shape (batch, patches + 1, hidden)."""
    return (torch.randn(batch, tokens(config), config.hidden_size, device=device, dtype=dtype, requires_grad=True),)


def shared_inputs(config: ViTConfig, type_index: int, inputs: tuple) -> tuple:
    """Inputs shared by all layers (counted once in OtherModules): none for ViT."""
    return ()
