"""The runtime contract every model family implements (bert, vit now; t5, swin next).

The runtime (backends/, train.py) never knows a family by name. It asks the family's adapter for:

1. `build_model(config, task, state_dict)`: the plain Hugging Face model for a task. Every layout
   (any pp/tp/dp/ZeRO) starts from ONE full state dict, so all plans and the single-process
   reference begin from identical weights.
2. `tensor_parallelize(model, task, tp)`: convert that model *in place* to tensor parallelism.
   Attention and MLP linears become Megatron-core Column/RowParallelLinear (built with an explicit
   process group, see model_zoo/tp.py) holding this rank's shard of the full weight; the word
   embedding becomes a VocabParallelEmbedding over a padded vocabulary. `tp` gives one group per
   Transformer layer plus one for the vocabulary layers, so per-layer TP degrees stay expressible.
   With groups of size 1 the call is a no-op.
3. `layer_sequence(model, task)`: the model cut into a flat sequence for pipelining, DeepSpeed
   `PipelineModule` style:

       embed entries (first stage) | one entry per Transformer layer | head entries (last stage)

   Every entry maps a tuple of tensors to a tuple of tensors (a single tensor is allowed at the
   very end, the head output); integer tensors (attention masks) may ride along between layers.
   The sequence ends in `loss_fn(head_output, labels) -> scalar` (mean over the micro-batch).
   Per-layer TP re-lays out every tensor passed between layers along dim 0 (the batch); runs of
   layers that pass TP-sharded tensors along (T5's position bias) are listed in
   `meta["same_tp_layout"]` as (start, end) layer ranges, which the runtime keeps on one layout.
   Entries that must share a weight across the first and last stage (tied word embeddings) carry
   the same `tie_key` and the same module object; for pp > 1 DeepSpeed keeps one copy per stage
   and all-reduces their gradients (TiedLayerSpec). Give the first occurrence no `forward_fn`
   (the module's own forward is its first use): DeepSpeed checkpoints a pipeline layer only when it
   is a module, not a function.
4. `synthetic_batch(config, task, num_samples, seed, step, seq_len)`: the global batch at a step, made on CPU
   from (seed, step) only, so every plan and world size sees the same data. Samples must carry the
   same number of labelled targets each (e.g. a fixed count of masked tokens) so that the mean of
   micro-batch means equals the mean over the whole global batch in any layout.
   `collate(config, task, records, seed, step, seq_len)` does the same from dataset records
   (`--data PATH`); its random choices (masking) also come from (seed, step) only. Records of raw
   text (the family's `text_fields`, e.g. BERT `text`, T5 `source`/`target`) first go through
   `tokenize(tokenizer, record, seq_len)` with the checkpoint folder's tokenizer.
5. `split_batch(batch, task)`: (pipeline inputs tuple, labels) from a batch dict; `hf_loss(model,
   batch)` the plain HF loss of the same batch (the single-process reference).
6. `flops_per_sample(config, task, seq_len)`: forward+backward model FLOPs per sample, for TFLOP/s metrics.
7. `set_dropout(config, p)`: every dropout probability of the config set to p (`--dropout`).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
Tensors = tuple[torch.Tensor, ...]


@dataclass
class TPGroups:
    """Process groups for tensor parallelism: one per Transformer layer, one for the vocabulary layers.

    Today every entry is the same Megatron-core TP group; keeping them separate is what lets a plan
    with per-layer TP degrees be built later without touching the family adapters.
    """

    layers: list[Any]           # torch.distributed.ProcessGroup per Transformer layer
    vocab: Any                  # group for embeddings / LM head (the plan's `vtp`)

    def layer(self, i: int) -> Any:
        return self.layers[i]

    @property
    def any_parallel(self) -> bool:
        return any(g.size() > 1 for g in self.layers) or self.vocab.size() > 1


@dataclass
class PipeEntry:
    """One element of the layer sequence.

    `forward_fn(module, inputs)` replaces `module(inputs)` when given; it is how a tied module is
    used differently at its two places (embedding lookup first, logits last).
    """

    module: nn.Module
    kind: str                                   # "embed" | "layer" | "head"
    tie_key: str | None = None
    forward_fn: Callable[[nn.Module, Any], Any] | None = None
    tied_weight_attr: str = "weight"

    def __call__(self, inputs: Any) -> Any:
        return self.forward_fn(self.module, inputs) if self.forward_fn else self.module(inputs)


@dataclass
class LayerSequence:
    """The model as `embed + layers + head` plus the loss that closes the last stage."""

    embed: list[PipeEntry]
    layers: list[PipeEntry]
    head: list[PipeEntry]
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def entries(self) -> list[PipeEntry]:
        return self.embed + self.layers + self.head

    @property
    def num_layers(self) -> int:
        return len(self.layers)


class FamilyAdapter(abc.ABC):
    """What a model family provides to the runtime. One subclass per family, in model_zoo/<family>/model.py."""

    family: str = ""
    tasks: tuple[str, ...] = ()
    default_task: str = ""

    # ------------------------------------------------------------------ models
    @abc.abstractmethod
    def build_model(self, config: Any, task: str, state_dict: dict | None = None) -> nn.Module:
        """The plain HF model for `task` (fp32, train mode), with `state_dict` loaded when given."""

    @abc.abstractmethod
    def num_layers(self, config: Any) -> int:
        """Transformer layers the plan's per-layer lists cover (encoder then decoder, stage by stage)."""

    @abc.abstractmethod
    def tensor_parallelize(self, model: nn.Module, task: str, tp: TPGroups) -> nn.Module:
        """Convert `model` in place to TP over `tp` (shards copied from its current full weights)."""

    @abc.abstractmethod
    def layer_sequence(self, model: nn.Module, task: str) -> LayerSequence:
        """Cut a (possibly tensor-parallel) model into embed | layers | head entries plus loss."""

    # ------------------------------------------------------------------ data
    @abc.abstractmethod
    def synthetic_batch(self, config: Any, task: str, num_samples: int, seed: int, step: int,
                        seq_len: int | None = None) -> Batch:
        """The global batch of `step`, generated on CPU from (seed, step) only.

        `seq_len` is the token count for text families (None: the config's maximum); vision
        families take the image size from the config and ignore it.
        """

    def collate(self, config: Any, task: str, records: list[dict], seed: int, step: int,
                seq_len: int | None = None) -> Batch:
        """A batch from dataset records (dicts of one sample each, e.g. input_ids/label or image/label)."""
        raise NotImplementedError(f"reading data files is not supported for {self.family} yet; use --data synthetic")

    # record fields of raw text that `tokenize` turns into token ids (empty: the family reads no text)
    text_fields: tuple[str, ...] = ()

    def tokenize(self, tokenizer: Any, record: dict, seq_len: Any = None) -> dict:
        """A record with its `text_fields` tokenized by the checkpoint's tokenizer (cut at `seq_len`)."""
        raise NotImplementedError(f"{self.family} reads no text; give records the fields collate() expects")

    def set_dropout(self, config: Any, p: float) -> list[str]:
        """Set every dropout probability of `config` to `p` (`--dropout`); returns the fields set.

        HF names them *dropout* (hidden_dropout_prob, attention_probs_dropout_prob, classifier_dropout,
        dropout_rate, ...) plus Swin's stochastic depth `drop_path_rate`; a family with other names
        overrides this.
        """
        names = [k for k, v in config.to_dict().items()
                 if ("dropout" in k or k == "drop_path_rate")
                 and (v is None or isinstance(v, (int, float)) and not isinstance(v, bool))]
        for k in names:
            setattr(config, k, float(p))
        return names

    @abc.abstractmethod
    def split_batch(self, batch: Batch, task: str) -> tuple[Tensors, torch.Tensor]:
        """(inputs for the first layer-sequence entry, labels for `loss_fn`)."""

    def hf_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Loss of the plain HF model on `batch` (the reference the runtime is checked against)."""
        return model(**batch).loss

    # ------------------------------------------------------------------ metrics
    @abc.abstractmethod
    def flops_per_sample(self, config: Any, task: str, seq_len: int | None = None) -> float:
        """Forward + backward model FLOPs per sample (2 per multiply-add; backward = 2x forward)."""

    def check_task(self, task: str | None) -> str:
        task = task or self.default_task
        if task not in self.tasks:
            raise ValueError(f"task {task!r} is not supported for {self.family}; use one of {', '.join(self.tasks)}")
        return task


def run_sequence(entries: Sequence[PipeEntry], inputs: Any) -> Any:
    """Apply entries in order (the pp=1 forward; DeepSpeed's PipelineModule does the same per stage)."""
    x = inputs
    for entry in entries:
        x = entry(x)
    return x
