"""Swin as the planner sees it: layer types per stage (HF SwinLayer) plus patch embedding and head.

Task: "image-classification" (SwinForImageClassification: final LayerNorm, average pool, classifier).

Layer types. Every layer of a stage has the same shapes and parameters, but two things can make layers
of one stage differ, and a layer type must describe identical layers:
- Patch merging (SwinPatchMerging, after every stage but the last) is folded into the LAST layer of its
  stage, which therefore gets its own type "swin_s<i>_merge" (count 1). The runtime cuts the model the
  same way (merging rides with that layer), so the plan's per-layer lists still cover the Transformer
  layers only, and parameters, FLOPs and activations sit on the right pipeline stage. Under TP the
  merging is replicated (its activations do not divide by tp).
- Shifted-window layers (odd layers of a stage whose resolution exceeds the window) get their own type
  "swin_s<i>_sw": they run extra ops (roll, mask) and on CUDA the memory-efficient kernel keeps their
  per-sample shifted-window mask (on CPU their saved bytes equal the unshifted ones).
Drop path keeps one random scalar per sample (counted when drop_path_rate > 0, also for the first
layer whose rate is 0: at most a few bytes per sample).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import SwinConfig
from transformers.models.swin.modeling_swin import SwinLayer, SwinPatchMerging, SwinRelativePositionBias

from model_zoo.accounting import (FP32, INT64, ActTally, activation_extra_saves, dropout_mask_bytes,
                                  efficient_bias_bytes, efficient_mask_last_dim, layernorm_bytes, sdpa_bytes,
                                  sdpa_fixed_bytes, sdpa_kernel, tp_degrees, vtp_degrees)
from model_zoo.base import PRECISION_BYTES, LayerType, ModelSpec, OtherModules

TASKS = ("image-classification",)


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


@dataclass(frozen=True)
class Stage:
    """Geometry of one Swin stage as HF runs it (window clamped to the resolution, input padded to windows)."""

    index: int
    dim: int
    heads: int
    depth: int
    height: int
    width: int
    window: int
    shift: int
    merges: bool           # followed by patch merging

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def padded_tokens(self) -> int:
        """Tokens after padding to whole windows (what attention and the window copies see)."""
        return math.ceil(self.height / self.window) * self.window * math.ceil(self.width / self.window) * self.window

    @property
    def windows(self) -> int:
        return self.padded_tokens // (self.window * self.window)

    @property
    def merged_tokens(self) -> int:
        return ((self.height + 1) // 2) * ((self.width + 1) // 2)


def stages(config: SwinConfig) -> list[Stage]:
    """Stage geometry: patch grid (image padded to whole patches), halved (rounded up) by each merging."""
    (ih, iw), (ph, pw) = _pair(config.image_size), _pair(config.patch_size)
    h, w = math.ceil(ih / ph), math.ceil(iw / pw)
    out = []
    n = len(config.depths)
    for i, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
        window, shift = config.window_size, config.window_size // 2
        if min(h, w) <= window:                                   # SwinLayer.set_shift_and_window_size
            window, shift = min(h, w), 0
        out.append(Stage(i, int(config.embed_dim * 2 ** i), heads, depth, h, w, window, shift, i < n - 1))
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


def ffn_width(config: SwinConfig, st: Stage) -> int:
    return int(config.mlp_ratio * st.dim)


# ---------------------------------------------------------------------------------------------- pieces
def block_params(config: SwinConfig, st: Stage) -> int:
    """SwinLayer: 2 LayerNorms, Q/K/V (bias if qkv_bias), O, relative-position table, fc1, fc2."""
    C, F = st.dim, ffn_width(config, st)
    qkv_bias = C if config.qkv_bias else 0
    table = (2 * config.window_size - 1) ** 2 * st.heads
    return 2 * 2 * C + 3 * (C * C + qkv_bias) + (C * C + C) + table + (C * F + F) + (F * C + C)


def merge_params(st: Stage) -> int:
    """SwinPatchMerging: LayerNorm(4C) + reduction 4C -> 2C without bias."""
    return 2 * 4 * st.dim + 4 * st.dim * 2 * st.dim


def block_flops(config: SwinConfig, st: Stage) -> float:
    """Projections over all (padded) tokens; attention within windows: 2 * 2 * tokens * window^2 * C."""
    C, F, N = st.dim, ffn_width(config, st), st.window * st.window
    P = st.padded_tokens
    return 2.0 * P * 4 * C * C + 2.0 * st.tokens * 2 * C * F + 4.0 * P * N * C


def merge_flops(st: Stage) -> float:
    return 2.0 * st.merged_tokens * 4 * st.dim * 2 * st.dim


def block_act(config: SwinConfig, st: Stage, shifted: bool, precision: str, device: str, tp: int = 1) -> ActTally:
    """Saved for backward by one SwinLayer (pre-LN), in forward order.

    LN1 input (layer input) + stats | window copy (Q/K/V input) | windowed attention with the relative
    position bias as an SDPA mask needing a gradient (CPU: math kernel keeps the probabilities; CUDA:
    memory-efficient kernel, which also keeps the per-sample mask of shifted windows) | LN2 input +
    stats | LN2 output (fc1 input) | fc1 output (GELU input) | GELU output (fc2 input) | dropout masks.
    `tp` only matters through the mask layout at one head per rank (efficient_mask_last_dim).
    """
    C, F, h, N = st.dim, ffn_width(config, st), st.heads, st.window * st.window
    a = PRECISION_BYTES[precision]
    p = config.attention_probs_dropout_prob
    kernel = sdpa_kernel(device, precision, bias_requires_grad=True, dropout=p)
    mask_dim = efficient_mask_last_dim(N, h // tp > 1) if kernel == "efficient" and shifted else 0
    t = ActTally()
    t.add(layernorm_bytes(st.tokens, C, a, device))
    t.add(st.padded_tokens * C * a)
    t.add(sdpa_bytes(kernel, N, N, h, C // h, a, groups=st.windows, mask_last_dim=mask_dim, dropout=p),
          sharded=True)
    t.add(layernorm_bytes(st.tokens, C, a, device))
    t.add(st.tokens * C * a)
    t.add((activation_extra_saves(config.hidden_act) + 1) * st.tokens * F * a, sharded=True)
    if config.hidden_dropout_prob > 0:
        t.add((st.padded_tokens + st.tokens) * C * dropout_mask_bytes(device, a))
    if config.drop_path_rate > 0:
        t.add(a)
    return t


def block_fixed(st: Stage, shifted: bool, precision: str, device: str, tp: int = 1) -> ActTally:
    """Saved once per micro-batch: CUDA's memory-efficient kernel keeps the unshifted layer's relative
    position bias (1, heads, N, N, last dim padded to 8) and its RNG state; the CPU math kernel nothing."""
    t = ActTally()
    if sdpa_kernel(device, precision, bias_requires_grad=True) == "efficient" and not shifted:
        N = st.window * st.window
        t.add(efficient_bias_bytes(st.heads, N, N, PRECISION_BYTES[precision], st.heads // tp > 1), sharded=True)
    t.add(sdpa_fixed_bytes(device))
    return t


def merge_act(st: Stage, a: int, device: str) -> int:
    """Patch merging: LayerNorm over the 2x2-concatenated tokens (input + stats) and its output."""
    return layernorm_bytes(st.merged_tokens, 4 * st.dim, a, device) + st.merged_tokens * 4 * st.dim * a


# ---------------------------------------------------------------------------------------------- layer types
@dataclass(frozen=True)
class LayerKind:
    """What makes one Swin layer's numbers: its stage, shifted windows, patch merging after it."""

    stage: int
    shifted: bool
    merge: bool


def layer_kinds(config: SwinConfig) -> list[LayerKind]:
    """One entry per layer in model order."""
    out = []
    for st in stages(config):
        for j in range(st.depth):
            out.append(LayerKind(st.index, st.shift > 0 and j % 2 == 1, st.merges and j == st.depth - 1))
    return out


def _layer_type(config: SwinConfig, kind: LayerKind, count: int, precision: str, device: str) -> LayerType:
    st = stages(config)[kind.stage]
    a = PRECISION_BYTES[precision]
    C, F = st.dim, ffn_width(config, st)
    params, flops = block_params(config, st), block_flops(config, st)
    merge = merge_act(st, a, device) if kind.merge else 0         # replicated under TP
    boundary = st.tokens * C * a
    if kind.merge:
        params, flops = params + merge_params(st), flops + merge_flops(st)
        boundary = st.merged_tokens * 2 * C * a
    name = f"swin_s{st.index}" + ("_sw" if kind.shifted else "") + ("_merge" if kind.merge else "")
    tps = tp_degrees(st.heads, F)
    act = {tp: block_act(config, st, kind.shifted, precision, device, tp).at_tp(tp) + merge for tp in tps}
    fixed = {tp: block_fixed(st, kind.shifted, precision, device, tp).at_tp(tp) for tp in tps}
    return LayerType(name=name, count=count, seq_len=st.tokens, hidden=C, heads=st.heads, ffn_hidden=F,
                     params=params, fwd_flops=flops, act_bytes=act,
                     ckpt_bytes=st.tokens * C * a, tp_allreduce_bytes=st.tokens * C * a, tp_allreduces_fwd=2,
                     boundary_bytes=boundary, act_fixed_bytes=fixed)


def layer_types(config: SwinConfig, precision: str, device: str) -> tuple[tuple[LayerType, ...], tuple[int, ...]]:
    """Layer types (in order of first appearance) and each layer's type index."""
    kinds = layer_kinds(config)
    unique = list(dict.fromkeys(kinds))
    types = tuple(_layer_type(config, k, kinds.count(k), precision, device) for k in unique)
    return types, tuple(unique.index(k) for k in kinds)


# ---------------------------------------------------------------------------------------------- other
def embedding_params(config: SwinConfig) -> int:
    """Patch conv (weight + bias), its LayerNorm, absolute position embeddings if used."""
    E = config.embed_dim
    ph, pw = _pair(config.patch_size)
    pos = stages(config)[0].tokens * E if config.use_absolute_embeddings else 0
    return config.num_channels * ph * pw * E + E + 2 * E + pos


def head_params(config: SwinConfig) -> int:
    """Final LayerNorm + classifier over the last stage's channels."""
    Cf, L = stages(config)[-1].dim, config.num_labels
    return 2 * Cf + Cf * L + L


def embedding_act(config: SwinConfig, a: int, device: str) -> int:
    """Pixels (patch conv weight gradient), embedding LayerNorm input + stats, dropout mask if any."""
    ih, iw = _pair(config.image_size)
    st = stages(config)[0]
    out = config.num_channels * ih * iw * a + layernorm_bytes(st.tokens, st.dim, a, device)
    if config.hidden_dropout_prob > 0:
        out += st.tokens * st.dim * dropout_mask_bytes(device, a)
    return out


def head_act(config: SwinConfig, a: int, device: str) -> int:
    """Final LN input + stats | pooled features (classifier input; average pooling keeps nothing) | fp32
    log-probs | label."""
    st = stages(config)[-1]
    return layernorm_bytes(st.tokens, st.dim, a, device) + st.dim * a + config.num_labels * FP32 + INT64


def other_modules(config: SwinConfig, precision: str, device: str) -> OtherModules:
    a = PRECISION_BYTES[precision]
    ph, pw = _pair(config.patch_size)
    first, last = stages(config)[0], stages(config)[-1]
    vtps = vtp_degrees()
    return OtherModules(
        params_first={v: embedding_params(config) for v in vtps},
        params_last={v: head_params(config) for v in vtps},
        tied_params={v: 0 for v in vtps},
        fwd_flops_first=2.0 * first.tokens * config.num_channels * ph * pw * config.embed_dim,
        fwd_flops_last=2.0 * last.dim * config.num_labels,
        act_bytes_first={v: embedding_act(config, a, device) for v in vtps},
        act_bytes_last={v: head_act(config, a, device) for v in vtps})


# ---------------------------------------------------------------------------------------------- API
def describe(config: SwinConfig, precision: str, seq_len: int | None = None, task: str = "image-classification", *,
             name: str = "", device: str = "cuda") -> ModelSpec:
    """ModelSpec of a Swin config; token counts come from image, patch and window sizes (seq_len ignored)."""
    if task not in TASKS:
        raise ValueError(f"task '{task}' is not supported for swin: use one of {', '.join(TASKS)}")
    types, order = layer_types(config, precision, device)
    return ModelSpec(name=name or "swin", family="swin", precision=precision, layer_types=types, layer_order=order,
                     other=other_modules(config, precision, device), hf_config=config.to_dict(), task=task,
                     seq_lens=tuple(st.tokens for st in stages(config)), act_device=device)


class SwinLayerWithMerge(nn.Module):
    """The last layer of a stage followed by the stage's patch merging (one planner layer)."""

    def __init__(self, layer: SwinLayer, downsample: SwinPatchMerging):
        super().__init__()
        self.layer, self.downsample = layer, downsample

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int]) -> tuple[torch.Tensor, None]:
        hidden_states, _ = self.layer(hidden_states, input_dimensions)
        return self.downsample(hidden_states, input_dimensions), None


def _kind(config: SwinConfig, type_index: int) -> LayerKind:
    """The kind of layer type `type_index` (types are listed in order of first appearance)."""
    unique = list(dict.fromkeys(layer_kinds(config)))
    if not 0 <= type_index < len(unique):
        raise IndexError(f"swin config has {len(unique)} layer types, not index {type_index}")
    return unique[type_index]


def make_layer(config: SwinConfig, type_index: int, *, kind: LayerKind | None = None) -> nn.Module:
    """HF SwinLayer (+ SwinPatchMerging for a *_merge type), train mode, SDPA attention.

    Type indices are those of describe(); pass `kind` (see layer_kinds) to pick a layer directly.
    """
    kind = kind or _kind(config, type_index)
    st = stages(config)[kind.stage]
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    layer = SwinLayer(config, dim=st.dim, input_resolution=(st.height, st.width), num_heads=st.heads,
                      drop_path_rate=config.drop_path_rate, shift_size=config.window_size // 2 if kind.shifted else 0)
    tp = getattr(config, "tp_shard", 1)
    if tp > 1:
        _shard(layer, tp, config.window_size)
    module = SwinLayerWithMerge(layer, SwinPatchMerging(st.dim)) if kind.merge else layer
    return module.train()


def tp_shard_config(config: SwinConfig, type_index: int, tp: int) -> SwinConfig:
    """A config for which make_layer builds one TP rank's shard (heads are per stage and tied to the
    stage width, so make_layer narrows the Linears and the bias table; patch merging stays replicated)."""
    kind = _kind(config, type_index)
    st = stages(config)[kind.stage]
    if st.heads % tp or ffn_width(config, st) % tp:
        raise ValueError(f"tp={tp} does not divide stage {st.index}'s {st.heads} heads and FFN "
                         f"{ffn_width(config, st)}: use a TP degree that does")
    config = copy.deepcopy(config)
    config.tp_shard = tp
    return config


def _shard(layer: SwinLayer, tp: int, window: int) -> None:
    """Megatron TP rank: Q/K/V and fc1 column-parallel, proj and fc2 row-parallel, bias table per head."""
    att = layer.attention
    att.num_attention_heads //= tp
    att.q_proj, att.k_proj, att.v_proj = (_narrow(m, out_div=tp) for m in (att.q_proj, att.k_proj, att.v_proj))
    att.o_proj = _narrow(att.o_proj, in_div=tp)
    att.relative_position_bias = SwinRelativePositionBias(att.num_attention_heads, (window, window))
    layer.mlp.fc1 = _narrow(layer.mlp.fc1, out_div=tp)
    layer.mlp.fc2 = _narrow(layer.mlp.fc2, in_div=tp)


def _narrow(linear: nn.Linear, in_div: int = 1, out_div: int = 1) -> nn.Linear:
    return nn.Linear(linear.in_features // in_div, linear.out_features // out_div, bias=linear.bias is not None)


def layer_inputs(config: SwinConfig, type_index: int, batch: int, device: torch.device | str, dtype: torch.dtype,
                 seq_len: int | None = None, *, kind: LayerKind | None = None) -> tuple:
    """(hidden_states (batch, tokens, dim), (height, width)) for the stage of the layer type."""
    kind = kind or _kind(config, type_index)
    st = stages(config)[kind.stage]
    hidden = torch.randn(batch, st.tokens, st.dim, device=device, dtype=dtype, requires_grad=True)
    return hidden, (st.height, st.width)


def shared_inputs(config: SwinConfig, type_index: int, inputs: tuple) -> tuple:
    """Inputs shared by all layers (counted once in OtherModules): none for Swin."""
    return ()
