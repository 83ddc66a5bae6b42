"""BERT as the planner sees it: one layer type (HF BertLayer, post-LayerNorm) plus embeddings and a head.

Tasks: "mlm" (BertForMaskedLM: transform + tied vocab projection + bias) and "text-classification"
(BertForSequenceClassification: pooler + classifier). Every number is per sample; formulas follow what
HF's modules and PyTorch autograd save (checked against saved_tensors_hooks in tests/).
"""
from __future__ import annotations

import copy

import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from model_zoo.accounting import (FP32, INT64, ActTally, activation_extra_saves, dropout_mask_bytes, layernorm_bytes,
                                  sdpa_bytes, sdpa_fixed_bytes, sdpa_kernel, tp_degrees, vtp_degrees)
from model_zoo.base import PRECISION_BYTES, LayerType, ModelSpec, OtherModules, pad_vocab

TASKS = ("mlm", "text-classification")


def default_seq_len(config: BertConfig) -> int:
    """Tokens per sample when none is given: the position table, at most BERT's 512."""
    return min(512, config.max_position_embeddings)


def _check_seq_len(config: BertConfig, seq_len: int) -> int:
    if not 0 < seq_len <= config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} does not fit BERT's {config.max_position_embeddings} positions: "
                         f"use 1..{config.max_position_embeddings}")
    return seq_len


# ---------------------------------------------------------------------------------------------- layer
def layer_params(config: BertConfig) -> int:
    """BertLayer: Q, K, V, O (with bias), 2 LayerNorms, fc1, fc2 (with bias)."""
    H, F = config.hidden_size, config.intermediate_size
    return 4 * (H * H + H) + 2 * 2 * H + (H * F + F) + (F * H + H)


def layer_flops(S: int, H: int, F: int) -> float:
    """Projections 2*S*(4H^2 + 2HF) plus attention scores and weighted sum 2 * 2*S^2*H."""
    return 2.0 * S * (4 * H * H + 2 * H * F) + 4.0 * S * S * H


def layer_act(config: BertConfig, S: int, precision: str, device: str) -> ActTally:
    """Saved for backward by one BertLayer (post-LN): per piece, in forward order.

    Layer input (Q/K/V input) | attention (q, k, v, output, fp32 log-sum-exp; no S x S matrix: SDPA
    without mask) | LN1 input + stats | LN1 output (fc1 input) | fc1 output (GELU input) | GELU output
    (fc2 input) | LN2 input + stats | dropout masks when hidden dropout > 0.
    """
    H, F, h = config.hidden_size, config.intermediate_size, config.num_attention_heads
    a = PRECISION_BYTES[precision]
    t = ActTally()
    t.add(S * H * a)                                                         # layer input
    p = config.attention_probs_dropout_prob
    kernel = sdpa_kernel(device, precision, bias_requires_grad=False, dropout=p)
    t.add(sdpa_bytes(kernel, S, S, h, H // h, a, dropout=p), sharded=True)
    t.add(layernorm_bytes(S, H, a, device))                                           # LN1(attn + input)
    t.add(S * H * a)                                                          # LN1 output = fc1 input
    t.add((activation_extra_saves(config.hidden_act) + 1) * S * F * a, sharded=True)
    t.add(layernorm_bytes(S, H, a, device))                                           # LN2(mlp + residual)
    if config.hidden_dropout_prob > 0:
        t.add(2 * S * H * dropout_mask_bytes(device, a))                      # after attn proj and fc2
    return t


def layer_type(config: BertConfig, S: int, precision: str, device: str) -> LayerType:
    H, F, h = config.hidden_size, config.intermediate_size, config.num_attention_heads
    a = PRECISION_BYTES[precision]
    act = layer_act(config, S, precision, device)
    return LayerType(
        name="bert_enc", count=config.num_hidden_layers, seq_len=S, hidden=H, heads=h, ffn_hidden=F,
        params=layer_params(config), fwd_flops=layer_flops(S, H, F),
        act_bytes={tp: act.at_tp(tp) for tp in tp_degrees(h, F)},
        ckpt_bytes=S * H * a, tp_allreduce_bytes=S * H * a, tp_allreduces_fwd=2, boundary_bytes=S * H * a,
        act_fixed_bytes={tp: sdpa_fixed_bytes(device) for tp in tp_degrees(h, F)})


# ---------------------------------------------------------------------------------------------- other
def embedding_params(config: BertConfig, vtp: int) -> int:
    H = config.hidden_size
    V = pad_vocab(config.vocab_size, vtp)
    return (V + config.max_position_embeddings + config.type_vocab_size) * H + 2 * H


def head_params(config: BertConfig, task: str, vtp: int) -> int:
    """mlm: transform dense + LN, tied decoder weight (also in tied_params), vocab bias; cls: pooler + classifier."""
    H = config.hidden_size
    if task == "mlm":
        V = pad_vocab(config.vocab_size, vtp)
        return (H * H + H) + 2 * H + V * H + V
    return (H * H + H) + (H * config.num_labels + config.num_labels)


def embedding_act(config: BertConfig, S: int, a: int, device: str) -> int:
    """Token ids (for the embedding backward) and the embedding LayerNorm; dropout mask if any."""
    out = S * INT64 + layernorm_bytes(S, config.hidden_size, a, device)
    if config.hidden_dropout_prob > 0:
        out += S * config.hidden_size * dropout_mask_bytes(device, a)
    return out


def head_act(config: BertConfig, task: str, S: int, a: int, vtp: int, device: str) -> int:
    """Head activations; the log-softmax is kept in the logits' dtype with the whole vocabulary on one
    rank (as Hugging Face and the runtime do) and in fp32 when it is vocab-parallel (Megatron's kernel).

    mlm: last hidden (transform input) | transform output (GELU input) | GELU output (LN input) + stats |
    LN output (vocab projection input) | fp32 log-probabilities over this rank's vocab slice | labels.
    cls: last hidden (the pooler reads token 0 of it) | tanh output | fp32 log-probabilities | label.
    """
    H = config.hidden_size
    if task == "mlm":
        V = pad_vocab(config.vocab_size, vtp) // vtp
        transform = (1 + activation_extra_saves(config.hidden_act)) * S * H * a + layernorm_bytes(S, H, a, device)
        return transform + S * H * a + S * V * (a if vtp == 1 else FP32) + S * INT64
    L = config.num_labels
    out = S * H * a + H * a + L * FP32 + INT64
    classifier_dropout = config.classifier_dropout
    if (config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout) > 0:
        out += H * (a + dropout_mask_bytes(device, a))                       # mask + dropped copy
    return out


def other_modules(config: BertConfig, task: str, S: int, precision: str, device: str) -> OtherModules:
    a = PRECISION_BYTES[precision]
    H, V, L = config.hidden_size, config.vocab_size, config.num_labels
    vtps = vtp_degrees()
    tied = {v: (pad_vocab(V, v) * H if task == "mlm" else 0) for v in vtps}
    return OtherModules(
        params_first={v: embedding_params(config, v) for v in vtps},
        params_last={v: head_params(config, task, v) for v in vtps},
        tied_params=tied,
        fwd_flops_first=0.0,                                                   # lookups, no matmul
        fwd_flops_last=(2.0 * S * H * H + 2.0 * S * H * V) if task == "mlm" else (2.0 * H * H + 2.0 * H * L),
        act_bytes_first={v: embedding_act(config, S, a, device) for v in vtps},
        act_bytes_last={v: head_act(config, task, S, a, v, device) for v in vtps},
        vocab_size=V)


# ---------------------------------------------------------------------------------------------- API
def describe(config: BertConfig, precision: str, seq_len: int | None, task: str, *, name: str = "",
             device: str = "cuda") -> ModelSpec:
    """ModelSpec of a BERT config for `task` at `seq_len` tokens per sample."""
    if task not in TASKS:
        raise ValueError(f"task '{task}' is not supported for bert: use one of {', '.join(TASKS)}")
    S = _check_seq_len(config, seq_len or default_seq_len(config))
    lt = layer_type(config, S, precision, device)
    return ModelSpec(name=name or "bert", family="bert", precision=precision, layer_types=(lt,),
                     layer_order=(0,) * config.num_hidden_layers,
                     other=other_modules(config, task, S, precision, device), hf_config=config.to_dict(),
                     task=task, seq_lens=(S,), act_device=device)


def _sdpa_config(config: BertConfig) -> BertConfig:
    """A copy that uses SDPA attention, as HF models built from a config do by default."""
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    return config


def make_layer(config: BertConfig, type_index: int = 0) -> torch.nn.Module:
    """One HF BertLayer (train mode); one Megatron TP rank's shard of it for a tp_shard_config config."""
    if type_index != 0:
        raise IndexError(f"bert has one layer type, not {type_index}")
    layer = BertLayer(_sdpa_config(config))
    tp = getattr(config, "tp_shard", 1)
    if tp > 1:
        _shard(layer, tp)
    return layer.train()


def tp_shard_config(config: BertConfig, type_index: int, tp: int) -> BertConfig:
    """A config for which make_layer builds one TP rank's shard (BERT ties head size to hidden / heads,
    so the shard cannot be a plain config: make_layer narrows the Linears instead)."""
    if config.num_attention_heads % tp or config.intermediate_size % tp:
        raise ValueError(f"tp={tp} does not divide {config.num_attention_heads} heads and FFN "
                         f"{config.intermediate_size}: use a TP degree that does")
    config = copy.deepcopy(config)
    config.tp_shard = tp
    return config


def _shard(layer: BertLayer, tp: int) -> None:
    """Megatron TP rank: Q/K/V and fc1 column-parallel (outputs / tp), proj and fc2 row-parallel (inputs / tp)."""
    att = layer.attention.self
    att.num_attention_heads //= tp
    att.all_head_size //= tp
    att.query, att.key, att.value = (_narrow(m, out_div=tp) for m in (att.query, att.key, att.value))
    layer.attention.output.dense = _narrow(layer.attention.output.dense, in_div=tp)
    layer.intermediate.dense = _narrow(layer.intermediate.dense, out_div=tp)
    layer.output.dense = _narrow(layer.output.dense, in_div=tp)


def _narrow(linear: torch.nn.Linear, in_div: int = 1, out_div: int = 1) -> torch.nn.Linear:
    return torch.nn.Linear(linear.in_features // in_div, linear.out_features // out_div, bias=linear.bias is not None)


def layer_inputs(config: BertConfig, type_index: int, batch: int, device: torch.device | str, dtype: torch.dtype,
                 seq_len: int | None = None) -> tuple:
    """(hidden_states,) for BertLayer: no attention mask (unpadded sequences, SDPA gets none)."""
    S = seq_len or default_seq_len(config)
    return (torch.randn(batch, S, config.hidden_size, device=device, dtype=dtype, requires_grad=True),)


def shared_inputs(config: BertConfig, type_index: int, inputs: tuple) -> tuple:
    """Inputs shared by all layers (counted once in OtherModules, not per layer): none for BERT."""
    return ()
