"""T5 runtime adapter: seq2seq (T5ForConditionalGeneration).

Layer sequence (the pipeline tuple each entry passes on, in brackets):
    embed:  shared embedding (tied with lm_head: one module used at both ends) looks up encoder and
            decoder tokens
                (input_ids, attention_mask, decoder_input_ids) -> (enc, attention_mask, dec)
            the embedding dropouts of both stacks
    layers: encoder block i:  (enc, attention_mask, dec[, enc_bias]) -> (enc, attention_mask, dec, enc_bias)
            the last encoder block also applies the encoder's final norm + dropout and drops the bias:
                -> (enc_out, attention_mask, dec)
            decoder block j:  (dec, attention_mask, enc_out[, dec_bias]) -> (dec, attention_mask, enc_out, dec_bias)
            (the first decoder block reads the last encoder block's tuple); the last one returns dec alone
    head:   decoder final norm + dropout (+ d_model**-0.5 when T5 scales tied logits) | logits from lm_head

Why this shape: the decoder tokens are embedded on the first stage because that is where the
shared embedding lives, and ride along through the encoder stages; the relative position bias is
computed by the first block of each stack (the owner of the bucket table, as in HF) and carried as a
tensor, so later blocks on any stage use it and its gradient flows back to the owner. Every float
tensor a stage sends is used downstream (DeepSpeed's pipeline expects a gradient back for each),
which is why the last block of each stack drops what is no longer needed.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.masking_utils import create_causal_mask

from model_zoo.adapter import Batch, FamilyAdapter, LayerSequence, PipeEntry, TPGroups
from model_zoo.common import answer_on_host, batch_generator, layer_padding_mask
from model_zoo.t5.spec import seq_lens as _seq_lens     # (encoder, decoder) tokens, as the planner reads them
from model_zoo.tp import (IGNORE_INDEX, VocabEmbedding, column_parallel, fork_rng_in_forward, heads_per_partition,
                          row_parallel, vocab_parallel_cross_entropy, vocab_parallel_embedding,
                          vocab_parallel_logits)

FIRST_TOKEN_ID = 2               # synthetic tokens skip pad (0) and eos (1)


# ---------------------------------------------------------------------------------------------- entries
def _logits(weight_owner: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from a [vocab, d_model] weight, vocab-parallel when it is TP-sharded."""
    if isinstance(weight_owner, VocabEmbedding):
        return vocab_parallel_logits(hidden, weight_owner, None)
    return F.linear(hidden, weight_owner.weight)


class SharedEmbed(nn.Module):
    """The shared token embedding as its own entry (its forward is the first use: encoder and decoder
    token lookups); with a tied lm_head it is the module the first and last stages share."""

    def __init__(self, shared: nn.Module):
        super().__init__()
        self.shared = shared

    def forward(self, inputs: tuple) -> tuple:
        input_ids, attention_mask, decoder_input_ids = inputs
        return self.shared(input_ids), attention_mask, self.shared(decoder_input_ids)


def tied_lm_logits(embed: SharedEmbed, hidden: torch.Tensor) -> torch.Tensor:
    """The tied lm_head: the shared embedding's second use, on the last stage."""
    return _logits(embed.shared, hidden)


class LMHead(nn.Module):
    """An untied lm_head (vocab-sharded like the embedding under TP)."""

    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _logits(self.lm_head, hidden)


class EmbedDropout(nn.Module):
    """The dropout each T5Stack applies to its input embeddings."""

    def __init__(self, encoder_dropout: nn.Module, decoder_dropout: nn.Module):
        super().__init__()
        self.encoder_dropout, self.decoder_dropout = encoder_dropout, decoder_dropout

    def forward(self, inputs: tuple) -> tuple:
        enc, attention_mask, dec = inputs
        return self.encoder_dropout(enc), attention_mask, self.decoder_dropout(dec)


class StackEnd(nn.Module):
    """A T5Stack's final RMS norm and dropout, optionally followed by a constant scale."""

    def __init__(self, norm: nn.Module, dropout: nn.Module, scale: float = 1.0):
        super().__init__()
        self.norm, self.dropout, self.scale = norm, dropout, scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.norm(hidden))
        return out * self.scale if self.scale != 1.0 else out


class EncoderLayer(nn.Module):
    """One encoder T5Block; the first computes the relative position bias, the last closes the stack."""

    def __init__(self, block: nn.Module, config: T5Config, end: StackEnd | None):
        super().__init__()
        self.block, self.config, self.end = block, config, end

    def forward(self, inputs: tuple) -> tuple:
        hidden, attention_mask, dec, *bias = inputs
        mask = layer_padding_mask(self.config, hidden, attention_mask)
        hidden, position_bias, _ = self.block(hidden, attention_mask=mask, position_bias=bias[0] if bias else None)
        if self.end is None:
            return hidden, attention_mask, dec, position_bias.contiguous()    # contiguous: p2p sends need it
        return self.end(hidden), attention_mask, dec


class DecoderLayer(nn.Module):
    """One decoder T5Block: causal self-attention, cross-attention over the encoder output, MLP."""

    def __init__(self, block: nn.Module, config: T5Config, first: bool, last: bool):
        super().__init__()
        self.block, self.config, self.first, self.last = block, config, first, last

    def forward(self, inputs: tuple) -> Any:
        if self.first:
            enc_out, attention_mask, hidden = inputs
            bias = None
        else:
            hidden, attention_mask, enc_out, bias = inputs
        causal = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        cross = layer_padding_mask(self.config, hidden, attention_mask, encoder_hidden_states=enc_out)
        hidden, position_bias, _ = self.block(hidden, attention_mask=causal, position_bias=bias,
                                              encoder_hidden_states=enc_out, encoder_attention_mask=cross)
        if self.last:
            return hidden
        return hidden, attention_mask, enc_out, position_bias.contiguous()


# ---------------------------------------------------------------------------------------------- TP
def _shard_relative_bias(table: nn.Embedding, group: Any) -> nn.Embedding:
    """This rank's heads (columns) of the relative-position bucket table."""
    heads = table.weight.shape[1]
    local = heads_per_partition(heads, group, "T5 relative position bias")
    rank = group.rank()
    sharded = nn.Embedding(table.num_embeddings, local, dtype=table.weight.dtype)
    with torch.no_grad():
        sharded.weight.copy_(table.weight[:, rank * local:(rank + 1) * local])
    set_tensor_model_parallel_attributes(sharded.weight, True, 1, 1)
    sharded.tp_group = group          # the shard's group, for exports (backends/export.py)
    return sharded


def _parallelize_attention(att: nn.Module, group: Any) -> None:
    """q, k, v split by heads (column), o by its input columns (row); heads per partition."""
    att.n_heads = heads_per_partition(att.n_heads, group, "T5 attention")
    att.inner_dim = att.n_heads * att.key_value_proj_dim
    att.q, att.k, att.v = (column_parallel(m, group) for m in (att.q, att.k, att.v))
    att.o = row_parallel(att.o, group)
    if att.has_relative_attention_bias:
        att.relative_attention_bias = _shard_relative_bias(att.relative_attention_bias, group)
    fork_rng_in_forward(att)          # dropout on attention probabilities of this rank's heads


def _parallelize_mlp(ff: nn.Module, group: Any) -> None:
    """wi (or the gated wi_0, wi_1) split by output column, wo by input row."""
    for name in ("wi", "wi_0", "wi_1"):
        if hasattr(ff, name):
            setattr(ff, name, column_parallel(getattr(ff, name), group))
    ff.wo = row_parallel(ff.wo, group)
    fork_rng_in_forward(ff)           # its dropout acts on this rank's slice of d_ff


def _as_embedding(linear: nn.Linear) -> nn.Embedding:
    """An untied lm_head as an embedding table (vocab rows), so it can be vocab-sharded the same way."""
    return nn.Embedding.from_pretrained(linear.weight.detach(), freeze=False)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.encoder.block) + list(model.decoder.block)


# ---------------------------------------------------------------------------------------------- adapter
class T5Adapter(FamilyAdapter):
    family = "t5"
    tasks = ("seq2seq",)
    default_task = "seq2seq"

    def build_model(self, config: T5Config, task: str, state_dict: dict | None = None) -> nn.Module:
        self.check_task(task)
        model = T5ForConditionalGeneration(config)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.train()

    def num_layers(self, config: T5Config) -> int:
        return config.num_layers + config.num_decoder_layers

    def tensor_parallelize(self, model: nn.Module, task: str, tp: TPGroups) -> nn.Module:
        for i, block in enumerate(_blocks(model)):
            g = tp.layer(i)
            if g.size() == 1:
                continue
            _parallelize_attention(block.layer[0].SelfAttention, g)
            if block.is_decoder:
                _parallelize_attention(block.layer[1].EncDecAttention, g)
            _parallelize_mlp(block.layer[-1].DenseReluDense, g)
        if tp.vocab.size() > 1:
            tied = model.lm_head.weight is model.shared.weight
            model.shared = vocab_parallel_embedding(model.shared, tp.vocab)
            model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared
            model.lm_head = model.shared if tied else vocab_parallel_embedding(_as_embedding(model.lm_head), tp.vocab)
        return model

    def layer_sequence(self, model: nn.Module, task: str) -> LayerSequence:
        config = model.config
        enc, dec = model.encoder, model.decoder
        tied = model.lm_head is model.shared or model.lm_head.weight is model.shared.weight
        shared = SharedEmbed(model.shared)
        if tied:
            first = PipeEntry(shared, "embed", tie_key="shared", tied_weight_attr="shared.weight")
            logits = PipeEntry(shared, "head", tie_key="shared", forward_fn=tied_lm_logits,
                               tied_weight_attr="shared.weight")
        else:
            first, logits = PipeEntry(shared, "embed"), PipeEntry(LMHead(model.lm_head), "head")
        n_enc, n_dec = len(enc.block), len(dec.block)
        layers = [PipeEntry(EncoderLayer(b, enc.config, StackEnd(enc.final_layer_norm, enc.dropout)
                                         if i == n_enc - 1 else None), "layer")
                  for i, b in enumerate(enc.block)]
        layers += [PipeEntry(DecoderLayer(b, dec.config, first=j == 0, last=j == n_dec - 1), "layer")
                   for j, b in enumerate(dec.block)]
        return LayerSequence(
            embed=[first, PipeEntry(EmbedDropout(enc.dropout, dec.dropout), "embed")],
            layers=layers,
            head=[PipeEntry(StackEnd(dec.final_layer_norm, dec.dropout, _output_scale(config)), "head"), logits],
            loss_fn=_lm_loss(model.shared if tied else model.lm_head, config.vocab_size),
            # each stack hands its position bias (split by heads under TP) from layer to layer
            meta={"same_tp_layout": [(0, n_enc), (n_enc, n_enc + n_dec)]})

    # ------------------------------------------------------------------ data
    def synthetic_batch(self, config: T5Config, task: str, num_samples: int, seed: int, step: int,
                        seq_len: int | tuple[int, int] | None = None) -> Batch:
        """Random source ids with a random amount of right padding; every sample has the same number of
        target tokens (all decoder positions are labelled), so micro-batch means compose exactly."""
        S, T = _seq_lens(seq_len)
        g = batch_generator(seed, step)
        input_ids = torch.randint(FIRST_TOKEN_ID, config.vocab_size, (num_samples, S), generator=g)
        lengths = torch.randint((S + 1) // 2, S + 1, (num_samples,), generator=g)
        attention_mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
        input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id)
        labels = torch.randint(FIRST_TOKEN_ID, config.vocab_size, (num_samples, T), generator=g)
        labels[:, -1] = config.eos_token_id if isinstance(config.eos_token_id, int) else FIRST_TOKEN_ID
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "decoder_input_ids": shift_right(labels, config), "labels": labels}

    def collate(self, config: T5Config, task: str, records: list[dict], seed: int, step: int,
                seq_len: int | tuple[int, int] | None = None) -> Batch:
        """Records with source `input_ids` and target `labels` (token ids), cut or padded to the
        (encoder, decoder) lengths: source padding is masked, target padding is ignored (-100).

        Real targets differ in length, so a micro-batch mean weighs tokens slightly differently from
        HF's mean over the whole batch (as with any token-averaged loss under gradient accumulation).
        """
        S, T = _seq_lens(seq_len)
        n = len(records)
        input_ids = torch.full((n, S), config.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, S), dtype=torch.long)
        labels = torch.full((n, T), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(records):
            if "input_ids" not in r or "labels" not in r:
                raise KeyError("T5 data records need source 'input_ids' and target 'labels' (token ids); "
                               f"this one has {', '.join(r)}")
            src, tgt = list(r["input_ids"])[:S], list(r["labels"])[:T]
            input_ids[i, :len(src)] = torch.tensor(src, dtype=torch.long)
            attention_mask[i, :len(src)] = 1
            labels[i, :len(tgt)] = torch.tensor(tgt, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "decoder_input_ids": shift_right(labels, config), "labels": labels}

    text_fields = ("source", "target")

    def tokenize(self, tokenizer: Any, record: dict, seq_len: int | tuple[int, int] | None = None) -> dict:
        """`source` -> input_ids, `target` -> labels (each ends in the tokenizer's </s>), cut at the
        (encoder, decoder) lengths."""
        S, T = _seq_lens(seq_len)
        out = dict(record)
        out["input_ids"] = tokenizer(record["source"], truncation=True, max_length=S)["input_ids"]
        out["labels"] = tokenizer(text_target=record["target"], truncation=True, max_length=T)["input_ids"]
        return out

    def split_batch(self, batch: Batch, task: str) -> tuple[tuple, torch.Tensor]:
        return (batch["input_ids"], answer_on_host(batch["attention_mask"]), batch["decoder_input_ids"]), batch["labels"]

    def flops_per_sample(self, config: T5Config, task: str, seq_len: int | tuple[int, int] | None = None) -> float:
        S, T = _seq_lens(seq_len)
        d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
        mlp = (3 if config.is_gated_act else 2) * 2 * d * ff          # per token
        enc = 2 * S * d * inner * 4 + 2 * S * S * inner * 2 + S * mlp
        dec = (2 * T * d * inner * 4 + 2 * T * T * inner * 2                  # causal self-attention (dense count)
               + 2 * T * d * inner * 2 + 2 * S * d * inner * 2 + 2 * T * S * inner * 2   # cross-attention
               + T * mlp)
        head = 2 * T * d * config.vocab_size
        return 3.0 * (config.num_layers * enc + config.num_decoder_layers * dec + head)


def shift_right(labels: torch.Tensor, config: T5Config) -> torch.Tensor:
    """Decoder inputs from labels, as T5's `_shift_right`: start token first, ignored labels become pad.

    Made here (and put in the batch) because HF 5 configs built from kwargs may lack
    decoder_start_token_id, which HF's own shift needs; T5 starts with the pad token.
    """
    start = getattr(config, "decoder_start_token_id", None)
    start = config.pad_token_id if start is None else start
    shifted = torch.full_like(labels, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, config.pad_token_id)


def _output_scale(config: T5Config) -> float:
    """T5 scales decoder outputs by d_model**-0.5 before tied logits (not T5 v1.1 / untied configs)."""
    scale = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)
    return config.d_model ** -0.5 if scale else 1.0


def _lm_loss(lm_head: nn.Module, vocab_size: int):
    if isinstance(lm_head, VocabEmbedding):
        start, group = lm_head.vocab_start_index, lm_head.tp_group

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return vocab_parallel_cross_entropy(logits, labels, start, group)
    else:
        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # In the logits' dtype, as Hugging Face does (see model_zoo/bert/model.py's _mlm_loss).
            return F.cross_entropy(logits.reshape(-1, vocab_size), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    return loss_fn


ADAPTER = T5Adapter()
