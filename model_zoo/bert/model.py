"""BERT runtime adapter: masked LM (BertForMaskedLM) and text classification (BertForSequenceClassification).

Layer sequence:
    embed: word embedding (tied with the MLM decoder) | position/type embeddings + LayerNorm
    layers: BertLayer x L, carrying (hidden, attention_mask) so every stage can rebuild the mask
    head:  mlm: transform | logits from the (tied) word embedding | + bias ; cls: pooler + classifier
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from model_zoo.adapter import Batch, FamilyAdapter, LayerSequence, PipeEntry, TPGroups
from model_zoo.common import (answer_on_host, batch_generator, classification_loss, encoder_layer_flops,
                               layer_padding_mask, record_label)
from model_zoo.tp import (VocabEmbedding, column_parallel, fork_rng_in_forward, heads_per_partition, row_parallel,
                          vocab_parallel_bias, vocab_parallel_cross_entropy, vocab_parallel_embedding,
                          vocab_parallel_logits)

MLM_PROBABILITY = 0.15
TASK_CLASSES = {"mlm": BertForMaskedLM, "text-classification": BertForSequenceClassification}


# ---------------------------------------------------------------------------------------------- entries
def _logits(decoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits without bias from a [vocab, hidden] weight (vocab-parallel when TP-sharded)."""
    if isinstance(decoder, VocabEmbedding):
        return vocab_parallel_logits(hidden, decoder, None)
    return F.linear(hidden, decoder.weight)


class WordEmbed(nn.Module):
    """The word embedding as its own entry; with a tied MLM decoder it is the module both stages share."""

    def __init__(self, word_embeddings: nn.Module):
        super().__init__()
        self.word_embeddings = word_embeddings

    def forward(self, inputs: tuple) -> tuple:
        input_ids, token_type_ids, attention_mask = inputs
        return self.word_embeddings(input_ids), token_type_ids, attention_mask


def tied_lm_logits(embed: WordEmbed, hidden: torch.Tensor) -> torch.Tensor:
    """The MLM decoder's use of the tied word embedding (its second place, on the last stage)."""
    return _logits(embed.word_embeddings, hidden)


class LMDecoder(nn.Module):
    """An untied MLM decoder weight."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _logits(self.decoder, hidden)


class EmbedRest(nn.Module):
    """HF BertEmbeddings without its word embedding (which is a separate, possibly tied, entry)."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, inputs: tuple) -> tuple:
        words, token_type_ids, attention_mask = inputs
        return self.embeddings(inputs_embeds=words, token_type_ids=token_type_ids), attention_mask


class LayerEntry(nn.Module):
    def __init__(self, layer: nn.Module, config: Any):
        super().__init__()
        self.layer = layer
        self.config = config

    def forward(self, inputs: tuple) -> tuple:
        hidden, attention_mask = inputs
        mask = layer_padding_mask(self.config, hidden, attention_mask)
        return self.layer(hidden, attention_mask=mask), attention_mask


class MLMTransform(nn.Module):
    def __init__(self, transform: nn.Module):
        super().__init__()
        self.transform = transform

    def forward(self, inputs: tuple) -> torch.Tensor:
        return self.transform(inputs[0])


class AddBias(nn.Module):
    def __init__(self, bias: nn.Parameter):
        super().__init__()
        self.bias = bias

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias


class ClassifierHead(nn.Module):
    def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module):
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

    def forward(self, inputs: tuple) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooler(inputs[0])))


# ---------------------------------------------------------------------------------------------- adapter
class BertAdapter(FamilyAdapter):
    family = "bert"
    tasks = ("mlm", "text-classification")
    default_task = "mlm"

    def build_model(self, config: BertConfig, task: str, state_dict: dict | None = None) -> nn.Module:
        model = TASK_CLASSES[self.check_task(task)](config)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.train()

    def num_layers(self, config: BertConfig) -> int:
        return config.num_hidden_layers

    def tensor_parallelize(self, model: nn.Module, task: str, tp: TPGroups) -> nn.Module:
        for i, layer in enumerate(model.bert.encoder.layer):
            g = tp.layer(i)
            if g.size() == 1:
                continue
            att = layer.attention.self
            att.num_attention_heads = heads_per_partition(att.num_attention_heads, g)
            att.all_head_size = att.num_attention_heads * att.attention_head_size
            att.query, att.key, att.value = (column_parallel(m, g) for m in (att.query, att.key, att.value))
            fork_rng_in_forward(att)
            layer.attention.output.dense = row_parallel(layer.attention.output.dense, g)
            layer.intermediate.dense = column_parallel(layer.intermediate.dense, g)
            layer.output.dense = row_parallel(layer.output.dense, g)
        if tp.vocab.size() > 1:
            emb = model.bert.embeddings
            old_words = emb.word_embeddings
            emb.word_embeddings = vocab_parallel_embedding(old_words, tp.vocab)
            if task == "mlm":
                preds = model.cls.predictions
                tied = preds.decoder.weight is old_words.weight
                preds.bias = vocab_parallel_bias(preds.decoder.bias, tp.vocab)
                preds.decoder = emb.word_embeddings if tied else vocab_parallel_embedding(preds.decoder, tp.vocab)
        return model

    def layer_sequence(self, model: nn.Module, task: str) -> LayerSequence:
        config = model.config
        emb = model.bert.embeddings
        words = emb.word_embeddings
        del emb.word_embeddings            # now its own entry; BertEmbeddings is called with inputs_embeds
        layers = [PipeEntry(LayerEntry(layer, config), "layer") for layer in model.bert.encoder.layer]
        word_embed = WordEmbed(words)
        if task == "mlm":
            preds = model.cls.predictions
            tied = preds.decoder.weight is words.weight
            bias = preds.decoder.bias if isinstance(preds.decoder, nn.Linear) else preds.bias
            if tied:
                embed = [PipeEntry(word_embed, "embed", tie_key="word_embeddings",
                                   tied_weight_attr="word_embeddings.weight")]
                logits = PipeEntry(word_embed, "head", tie_key="word_embeddings", forward_fn=tied_lm_logits,
                                   tied_weight_attr="word_embeddings.weight")
            else:
                embed = [PipeEntry(word_embed, "embed")]
                logits = PipeEntry(LMDecoder(preds.decoder), "head")
            head = [PipeEntry(MLMTransform(preds.transform), "head"), logits, PipeEntry(AddBias(bias), "head")]
            loss_fn = _mlm_loss(words if tied else preds.decoder, config.vocab_size)
        else:
            embed = [PipeEntry(word_embed, "embed")]
            head = [PipeEntry(ClassifierHead(model.bert.pooler, model.dropout, model.classifier), "head")]
            loss_fn = classification_loss(config.num_labels)
        embed.append(PipeEntry(EmbedRest(emb), "embed"))
        return LayerSequence(embed=embed, layers=layers, head=head, loss_fn=loss_fn)

    # ------------------------------------------------------------------ data
    def synthetic_batch(self, config: BertConfig, task: str, num_samples: int, seed: int, step: int,
                        seq_len: int | None = None) -> Batch:
        """Random token ids; MLM masks exactly the same number of tokens in every sample."""
        S = seq_len or config.max_position_embeddings
        g = batch_generator(seed, step)
        low = min(1000, config.vocab_size // 2)        # skip [PAD]/[CLS]/[MASK]-style special ids
        input_ids = torch.randint(low, config.vocab_size, (num_samples, S), generator=g)
        batch = {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids),
                 "attention_mask": torch.ones_like(input_ids)}
        if task == "mlm":
            batch.update(_mask_tokens(input_ids, torch.ones_like(input_ids, dtype=torch.bool), g,
                                      _mask_token_id(config)))
        else:
            n = max(config.num_labels, 1)
            batch["labels"] = (torch.randn(num_samples, generator=g) if n == 1
                               else torch.randint(0, n, (num_samples,), generator=g))
        return batch

    def collate(self, config: BertConfig, task: str, records: list[dict], seed: int, step: int,
                seq_len: int | None = None) -> Batch:
        """Records with `input_ids` (tokenized), optional `token_type_ids`, and `label` for classification.

        Samples are cut or padded to `seq_len`; MLM masks 15% of each sample's real tokens.
        """
        S = seq_len or config.max_position_embeddings
        pad = config.pad_token_id or 0
        n = len(records)
        input_ids = torch.full((n, S), pad, dtype=torch.long)
        token_type_ids = torch.zeros((n, S), dtype=torch.long)
        attention_mask = torch.zeros((n, S), dtype=torch.long)
        for i, r in enumerate(records):
            if "input_ids" not in r:
                raise KeyError("BERT data records need 'input_ids' (tokenize text first, or give --model a "
                               "checkpoint folder with a tokenizer)")
            ids = list(r["input_ids"])[:S]
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, :len(ids)] = 1
            if "token_type_ids" in r:
                types = list(r["token_type_ids"])[:S]
                token_type_ids[i, :len(types)] = torch.tensor(types, dtype=torch.long)
        batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
        if task == "mlm":
            maskable = attention_mask.bool() & (input_ids != pad)
            batch.update(_mask_tokens(input_ids, maskable, batch_generator(seed, step), _mask_token_id(config)))
        else:
            dtype = torch.float if config.num_labels == 1 else torch.long
            batch["labels"] = torch.tensor([record_label(r) for r in records], dtype=dtype)
        return batch

    text_fields = ("text",)

    def tokenize(self, tokenizer: Any, record: dict, seq_len: Any = None) -> dict:
        """`text` -> input_ids, token_type_ids ([CLS] ... [SEP], cut at seq_len); other fields (label) kept."""
        out = dict(record)
        out.update(tokenizer(record["text"], truncation=seq_len is not None, max_length=seq_len))
        return out

    def split_batch(self, batch: Batch, task: str) -> tuple[tuple, torch.Tensor]:
        return (batch["input_ids"], batch["token_type_ids"], answer_on_host(batch["attention_mask"])), batch["labels"]

    def flops_per_sample(self, config: BertConfig, task: str, seq_len: int | None = None) -> float:
        S, H = seq_len or config.max_position_embeddings, config.hidden_size
        fwd = config.num_hidden_layers * encoder_layer_flops(S, H, config.intermediate_size)
        if task == "mlm":
            fwd += 2 * S * H * H + 2 * S * H * config.vocab_size
        else:
            fwd += 2 * H * H + 2 * H * config.num_labels
        return 3.0 * fwd


def _mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, g: torch.Generator, mask_id: int) -> Batch:
    """Replace round(15%) of each sample's maskable tokens by [MASK]; labels elsewhere are -100.

    With every token maskable (synthetic data) each sample gets the same count, so micro-batch means
    average to the global-batch mean in any layout.
    """
    counts = (maskable.sum(dim=1).float() * MLM_PROBABILITY).round().clamp(min=1).long()
    score = torch.rand(input_ids.shape, generator=g).masked_fill(~maskable, 2.0)
    rank = score.argsort(dim=1).argsort(dim=1)
    picked = (rank < counts.unsqueeze(1)) & maskable
    return {"labels": input_ids.masked_fill(~picked, -100), "input_ids": input_ids.masked_fill(picked, mask_id)}


def _mask_token_id(config: BertConfig) -> int:
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None:
        mask_id = 103 if config.vocab_size > 103 else config.vocab_size - 1   # [MASK] in BERT's vocabulary
    return int(mask_id)


def _mlm_loss(decoder: nn.Module, vocab_size: int):
    if isinstance(decoder, VocabEmbedding):
        start, group = decoder.vocab_start_index, decoder.tp_group

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return vocab_parallel_cross_entropy(logits, labels, start, group)
    else:
        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # In the logits' dtype, as Hugging Face does (the kernel accumulates in fp32): an fp32 copy of
            # bf16 logits would keep 4 bytes per token and vocabulary entry for backward, and its fp32
            # gradient would double the head's transient memory (7 GB more at BERT-large batch 64).
            return F.cross_entropy(logits.view(-1, vocab_size), labels.view(-1))
    return loss_fn


ADAPTER = BertAdapter()
