"""T5 as the planner sees it: two layer types (HF T5Block as encoder and as decoder) plus embeddings and head.

Task: "seq2seq" (T5ForConditionalGeneration). Conventions that make the layers identical and the totals exact:
- The relative-attention-bias tables live in block 0 of each stack in HF; here both are counted with the
  first stage's other modules (the first stage computes the position biases every layer of a stack
  shares), so every block of a stack has the same parameters.
- The first stage embeds both the encoder and the decoder tokens (one shared, tied embedding), so every
  stage boundary carries both streams: (S_enc + S_dec) * d_model values per sample.
- Tensors every decoder layer reads but none owns are counted once in OtherModules (last stage): the
  encoder output (cross-attention keys/values input). With decoder layers on several pipeline stages
  each of those stages holds its own copy; the spec cannot say so and counts it once.
- Tensors without a batch dimension (the decoder's per-layer position-bias copy and causal mask, SDPA
  RNG state) are in LayerType.act_fixed_bytes (once per micro-batch), not in the per-sample act_bytes.
- Source batches are taken as padded (real data almost always is, and so is the runtime's synthetic
  data): each layer then builds a bool attention mask, and HF merges it with the position bias per layer
  into a per-sample SDPA mask. An unpadded micro-batch holds less.
- The encoder's final norm is counted with the last stage's other modules (its d_model weights; its
  activations are those of the encoder output it produces).
"""
from __future__ import annotations

import copy

import torch
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Attention, T5Block

from model_zoo.accounting import (FP32, INT64, ActTally, activation_extra_saves, dropout_mask_bytes,
                                  efficient_bias_bytes, efficient_mask_last_dim, sdpa_bytes, sdpa_fixed_bytes,
                                  sdpa_kernel, tp_degrees, vtp_degrees)
from model_zoo.base import PRECISION_BYTES, LayerType, ModelSpec, OtherModules, pad_vocab

TASKS = ("seq2seq",)
DEFAULT_SEQ = (512, 128)   # encoder, decoder tokens per sample (decoder = encoder / 4 when only one is given)
ENCODER, DECODER = 0, 1


def seq_lens(seq_len: int | tuple[int, int] | None) -> tuple[int, int]:
    """(encoder, decoder) tokens: an int sets the encoder and keeps the default 4:1 ratio."""
    if seq_len is None:
        return DEFAULT_SEQ
    if isinstance(seq_len, int):
        return seq_len, max(1, seq_len * DEFAULT_SEQ[1] // DEFAULT_SEQ[0])
    enc, dec = seq_len
    return int(enc), int(dec)


def _inner(config: T5Config) -> int:
    return config.num_heads * config.d_kv


# ---------------------------------------------------------------------------------------------- pieces
def t5_norm_bytes(S: int, H: int, a: int) -> int:
    """T5LayerNorm (RMS, computed in fp32) saves its input, an fp32 copy (only if not already fp32),
    the fp32 1/rms per token and the normalised input cast back to the activation dtype."""
    return S * H * a + (S * H * FP32 if a != FP32 else 0) + S * FP32 + S * H * a


def ffn_bytes(config: T5Config, S: int, a: int, device: str) -> int:
    """Dense-act-dense or gated: activation saves + its output (wo input); gated adds the linear branch
    and the product; dropout > 0 keeps a mask and a separate dropped copy (the wo input)."""
    F = config.d_ff
    saves = activation_extra_saves(config.dense_act_fn) + 1
    if config.is_gated_act:
        saves += 2                                       # wi_1 output and act*wi_1 product (both for mul)
    out = saves * S * F * a
    if config.dropout_rate > 0:
        out += S * F * (a + dropout_mask_bytes(device, a))
    return out


def attention_kernel(config: T5Config, device: str, precision: str, bias_requires_grad: bool) -> str:
    """T5 always passes its position bias as an SDPA mask; it needs a gradient in self-attention only."""
    return sdpa_kernel(device, precision, bias_requires_grad=bias_requires_grad, dropout=config.dropout_rate)


# ---------------------------------------------------------------------------------------------- layers
def layer_params(config: T5Config, type_index: int) -> int:
    """T5Block without relative bias: attention (q, k, v, o; no bias) + RMS norm per sublayer, FFN + norm."""
    H, F = config.d_model, config.d_ff
    attention = 4 * H * _inner(config) + H
    ffn = (3 if config.is_gated_act else 2) * H * F + H
    return attention * (2 if type_index == DECODER else 1) + ffn


def layer_flops(config: T5Config, type_index: int, enc: int, dec: int) -> float:
    """Matmul FLOPs: projections, scores and weighted sums; the decoder adds cross-attention over enc tokens."""
    H, F, inner = config.d_model, config.d_ff, _inner(config)
    ffn_mats = 3 if config.is_gated_act else 2
    S = enc if type_index == ENCODER else dec
    flops = 2.0 * S * (4 * H * inner + ffn_mats * H * F) + 4.0 * S * S * inner
    if type_index == DECODER:
        flops += 2.0 * (2 * dec + 2 * enc) * H * inner + 4.0 * dec * enc * inner
    return flops


def layer_act(config: T5Config, type_index: int, enc: int, dec: int, precision: str, device: str) -> ActTally:
    """Saved for backward by one T5Block (pre-norm, residual stream not normalised), in forward order.

    Per sublayer: RMS norm (t5_norm_bytes) | its output (projection input) | the sublayer's saves |
    dropout mask if dropout > 0. Self-attention: position bias as a mask that needs a gradient (the math
    kernel on CPU keeps the probabilities). Decoder cross-attention: q from the decoder, k and v projected
    from the (shared, not counted here) encoder output; its zero bias needs no gradient. fp16: T5 clamps
    the residual stream after every sublayer, and clamp keeps its input.
    Padded sources (see the module docstring): the encoder's SDPA mask is torch.where(bool mask, position
    bias, min) per layer, which keeps its bool condition (the bias needs a gradient), and the decoder's
    cross-attention mask is the same where over its zero bias; CUDA's kernels keep either mask (padded
    to the memory-efficient kernel's alignment), CPU's math kernel neither.
    """
    H, h, dk = config.d_model, config.num_heads, config.d_kv
    a = PRECISION_BYTES[precision]
    S = enc if type_index == ENCODER else dec
    sublayers = 3 if type_index == DECODER else 2
    t = ActTally()
    for _ in range(sublayers):
        t.add(t5_norm_bytes(S, H, a) + S * H * a)                             # norm + its output
        if config.dropout_rate > 0:
            t.add(S * H * dropout_mask_bytes(device, a))
        if precision == "fp16":
            t.add(S * H * a)                                                  # clamp input
    p = config.dropout_rate
    t.add(sdpa_bytes(attention_kernel(config, device, precision, True), S, S, h, dk, a, dropout=p), sharded=True)
    if type_index == ENCODER:
        t.add(S * S)                                                          # where's bool condition
        t.add(_kept_mask_bytes(attention_kernel(config, device, precision, True), h, S, S, a), sharded=True)
    if type_index == DECODER:
        kernel = attention_kernel(config, device, precision, False)
        t.add(sdpa_bytes(kernel, dec, enc, h, dk, a, dropout=p), sharded=True)
        t.add(_kept_mask_bytes(kernel, h, dec, enc, a), sharded=True)
    t.add(ffn_bytes(config, S, a, device), sharded=True)
    return t


def _kept_mask_bytes(kernel: str, heads: int, q_len: int, kv_len: int, a: int) -> int:
    """Per sample: the additive mask a CUDA attention kernel keeps for backward (math keeps none)."""
    if kernel == "math":
        return 0
    last = efficient_mask_last_dim(kv_len) if kernel == "efficient" else kv_len
    return heads * q_len * last * a


def layer_fixed(config: T5Config, type_index: int, enc: int, dec: int, precision: str, device: str) -> ActTally:
    """Saved once per micro-batch (no batch dimension), as HF's T5 runs.

    Decoder self-attention (no padding mask: causal): HF hands SDPA a causal torch.where of the position
    bias (whose bool condition is kept), and CUDA's memory-efficient kernel keeps that mask. Every CUDA
    attention call keeps its RNG seed and offset. fp16: each clamp keeps its bounds (two fp32 scalars).
    The encoder's and the cross-attention's masks have a batch dimension (layer_act).
    """
    a = PRECISION_BYTES[precision]
    h = config.num_heads
    t = ActTally()
    if precision == "fp16":
        t.add((3 if type_index == DECODER else 2) * 2 * FP32)
    if type_index == DECODER:
        t.add(dec * dec)                                                      # causal condition (bool)
        if attention_kernel(config, device, precision, True) == "efficient":
            t.add(efficient_bias_bytes(h, dec, dec, a), sharded=True)
        t.add(sdpa_fixed_bytes(device))
    t.add(sdpa_fixed_bytes(device))
    return t


def layer_type(config: T5Config, type_index: int, enc: int, dec: int, precision: str, device: str) -> LayerType:
    a = PRECISION_BYTES[precision]
    H, h = config.d_model, config.num_heads
    S = enc if type_index == ENCODER else dec
    act = layer_act(config, type_index, enc, dec, precision, device)
    tps = tp_degrees(h, config.d_ff)
    return LayerType(
        name="t5_enc" if type_index == ENCODER else "t5_dec",
        count=config.num_layers if type_index == ENCODER else config.num_decoder_layers,
        seq_len=S, hidden=H, heads=h, ffn_hidden=config.d_ff,
        params=layer_params(config, type_index), fwd_flops=layer_flops(config, type_index, enc, dec),
        act_bytes={tp: act.at_tp(tp) for tp in tps},
        ckpt_bytes=S * H * a,                                   # the hidden stream; shared inputs counted once
        tp_allreduce_bytes=S * H * a, tp_allreduces_fwd=3 if type_index == DECODER else 2,
        boundary_bytes=(enc + dec) * H * a,
        act_fixed_bytes={tp: layer_fixed(config, type_index, enc, dec, precision, device).at_tp(tp) for tp in tps},
        relayout_inside=False)                                  # the position bias is split by heads


# ---------------------------------------------------------------------------------------------- other
def _lm_head_tied(config: T5Config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", True))


def first_params(config: T5Config, vtp: int) -> int:
    """Shared embedding (padded vocab) and both relative-attention-bias tables (buckets x heads)."""
    tables = 2 * config.relative_attention_num_buckets * config.num_heads
    return pad_vocab(config.vocab_size, vtp) * config.d_model + tables


def last_params(config: T5Config, vtp: int) -> int:
    """Encoder and decoder final norms, LM head (the tied embedding when tie_word_embeddings)."""
    return 2 * config.d_model + pad_vocab(config.vocab_size, vtp) * config.d_model


def first_act(config: T5Config, enc: int, dec: int, a: int, device: str) -> int:
    """Encoder and decoder token ids (embedding backward); embedding dropout masks if any."""
    out = (enc + dec) * INT64
    if config.dropout_rate > 0:
        out += (enc + dec) * config.d_model * dropout_mask_bytes(device, a)
    return out


def last_act(config: T5Config, enc: int, dec: int, a: int, vtp: int, device: str) -> int:
    """Encoder final norm + the encoder output every cross-attention reads (once) | decoder final norm +
    LM-head input | log-probabilities over this rank's vocab slice (the logits' dtype at vtp=1, fp32 when
    vocab-parallel, as the runtime computes them) | labels. Dropout: masks."""
    H = config.d_model
    V = pad_vocab(config.vocab_size, vtp) // vtp
    out = t5_norm_bytes(enc, H, a) + enc * H * a + t5_norm_bytes(dec, H, a) + dec * H * a
    out += dec * V * (a if vtp == 1 else FP32) + dec * INT64
    if config.dropout_rate > 0:
        out += (enc + dec) * H * dropout_mask_bytes(device, a)
    return out


def other_modules(config: T5Config, enc: int, dec: int, precision: str, device: str) -> OtherModules:
    a = PRECISION_BYTES[precision]
    vtps = vtp_degrees()
    tied = _lm_head_tied(config)
    return OtherModules(
        params_first={v: first_params(config, v) for v in vtps},
        params_last={v: last_params(config, v) for v in vtps},
        tied_params={v: (pad_vocab(config.vocab_size, v) * config.d_model if tied else 0) for v in vtps},
        fwd_flops_first=0.0,
        fwd_flops_last=2.0 * dec * config.d_model * config.vocab_size,
        act_bytes_first={v: first_act(config, enc, dec, a, device) for v in vtps},
        act_bytes_last={v: last_act(config, enc, dec, a, v, device) for v in vtps},
        vocab_size=config.vocab_size)


# ---------------------------------------------------------------------------------------------- API
def describe(config: T5Config, precision: str, seq_len: int | tuple[int, int] | None, task: str = "seq2seq", *,
             name: str = "", device: str = "cuda") -> ModelSpec:
    """ModelSpec of a T5 config: encoder layers then decoder layers."""
    if task not in TASKS:
        raise ValueError(f"task '{task}' is not supported for t5: use one of {', '.join(TASKS)}")
    enc, dec = seq_lens(seq_len)
    types = tuple(layer_type(config, i, enc, dec, precision, device) for i in (ENCODER, DECODER))
    order = (ENCODER,) * config.num_layers + (DECODER,) * config.num_decoder_layers
    return ModelSpec(name=name or "t5", family="t5", precision=precision, layer_types=types, layer_order=order,
                     other=other_modules(config, enc, dec, precision, device), hf_config=config.to_dict(),
                     task=task, seq_lens=(enc, dec), act_device=device)


def _stack_config(config: T5Config, type_index: int) -> T5Config:
    """The encoder or decoder stack's config, as T5ForConditionalGeneration derives it, with SDPA."""
    config = copy.deepcopy(config)
    config.is_decoder = type_index == DECODER
    config.use_cache = False
    config.is_encoder_decoder = False
    if type_index == DECODER:
        config.num_layers = config.num_decoder_layers
    config._attn_implementation = "sdpa"
    return config


def make_layer(config: T5Config, type_index: int) -> torch.nn.Module:
    """One HF T5Block of the encoder (0) or decoder (1) without relative bias (blocks 1.. of a stack)."""
    if type_index not in (ENCODER, DECODER):
        raise IndexError(f"t5 has layer types 0 (encoder) and 1 (decoder), not {type_index}")
    return T5Block(_stack_config(config, type_index), has_relative_attention_bias=False, layer_idx=1).train()


def tp_shard_config(config: T5Config, type_index: int, tp: int) -> T5Config:
    """The config whose T5Block is one Megatron TP rank's shard: heads / tp (same d_kv), d_ff / tp."""
    if config.num_heads % tp or config.d_ff % tp:
        raise ValueError(f"tp={tp} does not divide {config.num_heads} heads and d_ff {config.d_ff}: "
                         f"use a TP degree that does")
    config = copy.deepcopy(config)
    config.num_heads //= tp
    config.d_ff //= tp
    return config


def layer_inputs(config: T5Config, type_index: int, batch: int, device: torch.device | str, dtype: torch.dtype,
                 seq_len: int | tuple[int, int] | None = None) -> tuple:
    """Positional inputs of T5Block.forward as the runtime's layers (model_zoo/t5/model.py) pass them to
    blocks after the first, for a padded source batch (see the module docstring).

    Encoder: (hidden, bool padding mask, position bias). Decoder: (hidden, None mask (causal: SDPA builds
    it from the bias path), self-attention position bias, encoder output, bool cross-attention padding
    mask, None cross bias (the block makes its zero bias)). The position biases need a gradient (they come
    from the learned bias table), as in the real model. The masks are [batch, 1, queries, keys] with the
    last key masked, as create_bidirectional_mask builds them per layer.
    """
    enc, dec = seq_lens(seq_len)
    stack = _stack_config(config, type_index)
    S = enc if type_index == ENCODER else dec
    hidden = torch.randn(batch, S, config.d_model, device=device, dtype=dtype, requires_grad=True)
    bias_table = T5Attention(stack, has_relative_attention_bias=True, layer_idx=0).to(device=device, dtype=dtype)
    position_bias = bias_table.compute_bias(S, S, device=device)
    padding = torch.ones(batch, 1, S, enc, dtype=torch.bool, device=device)
    padding[..., -1] = False
    if type_index == ENCODER:
        return hidden, padding, position_bias
    encoder_out = torch.randn(batch, enc, config.d_model, device=device, dtype=dtype, requires_grad=True)
    return hidden, None, position_bias, encoder_out, padding, None


def rebuilt_inputs(config: T5Config, type_index: int, inputs: tuple) -> tuple:
    """The padding masks: the runtime's layer builds them from the token mask it passes on, so a
    checkpointed layer keeps the (shared) token mask, not these."""
    return tuple(x for x in inputs if isinstance(x, torch.Tensor) and x.dtype == torch.bool)


def shared_inputs(config: T5Config, type_index: int, inputs: tuple) -> tuple:
    """The inputs every layer of a stack shares (counted once in OtherModules, not per layer): the position
    bias and the encoder output. The padding masks are built per layer (layer_inputs)."""
    return tuple(x for x in inputs[2:4] if isinstance(x, torch.Tensor))
