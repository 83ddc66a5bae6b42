"""What the planner knows about a model: layer types, parameters, FLOPs and activation bytes.

Every number here is per *sample* and per *layer of one type*; the cost model multiplies by the
micro-batch size and the layer counts. Family files (model_zoo/<family>/spec.py) build a
`ModelSpec` from a Hugging Face config; nothing outside model_zoo/ knows a family by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
IGNORE_INDEX = -100          # label of a sample or token that no loss or metric counts (HF's convention)


def pow2_upto(n: int) -> list[int]:
    """Powers of two 1, 2, 4, ... that are <= n."""
    out, x = [], 1
    while x <= n:
        out.append(x)
        x *= 2
    return out


def pad_vocab(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """Vocabulary padded so each of `tp` shards gets an equal, `multiple`-aligned slice (as Megatron)."""
    step = tp * multiple
    return ((vocab_size + step - 1) // step) * step


@dataclass(frozen=True)
class LayerType:
    """One kind of Transformer layer (BERT: 1 type; T5: encoder, decoder; Swin: one per stage)."""

    name: str                    # e.g. "bert_enc", "t5_dec", "swin_stage2"
    count: int                   # number of layers of this type in the model
    seq_len: int                 # tokens one layer processes per sample
    hidden: int
    heads: int
    ffn_hidden: int
    params: int                  # exact trainable parameters of ONE layer (HF module)
    fwd_flops: float             # forward FLOPs of one layer per sample (2 per multiply-add)
    act_bytes: Mapping[int, int]  # TP degree -> bytes saved for backward per sample (no checkpointing)
    ckpt_bytes: int              # bytes kept per sample when the layer is checkpointed (its inputs)
    tp_allreduce_bytes: int      # bytes of ONE TP all-reduce of the layer output per sample (S*H*dtype)
    tp_allreduces_fwd: int       # TP all-reduces in forward (2 self-attn + MLP; 3 with cross-attention)
    boundary_bytes: int          # bytes per sample sent to the next layer / pipeline stage (p2p)
    # TP degree -> bytes saved for backward once per micro-batch whatever its size (tensors without a
    # batch dimension: T5 position-bias copies, causal masks, Swin relative-position bias, SDPA RNG seeds)
    act_fixed_bytes: Mapping[int, int] = field(default_factory=dict)
    # False when consecutive layers of this type pass tensors split by attention head (T5's position
    # bias): the TP layout may then not change between two of them (LayerSequence.meta["same_tp_layout"])
    relayout_inside: bool = True

    def tp_ok(self, tp: int) -> bool:
        """TP must divide the heads of the layer (heads per partition)."""
        return tp >= 1 and self.heads % tp == 0 and tp in self.act_bytes


@dataclass(frozen=True)
class OtherModules:
    """Everything that is not a repeated layer: embeddings (first stage) and heads/norms (last stage).

    Parameter counts depend on the vocabulary TP degree because the vocabulary is padded to a
    multiple of it; they are given per vocab-TP degree.
    """

    params_first: Mapping[int, int]      # vtp -> params on the first stage (embeddings ...)
    params_last: Mapping[int, int]       # vtp -> params on the last stage (final norm, head ...)
    tied_params: Mapping[int, int]       # vtp -> params shared by first and last (tied word embeddings)
    fwd_flops_first: float               # per sample
    fwd_flops_last: float                # per sample
    act_bytes_first: Mapping[int, int]   # vtp -> bytes kept for backward per sample
    act_bytes_last: Mapping[int, int]    # vtp -> bytes kept for backward per sample (logits, loss ...)
    vocab_size: int = 0                  # 0 for vision models

    def params_total(self, vtp: int) -> int:
        """Parameters of the unsplit model's other modules (tied weights counted once)."""
        return self.params_first[vtp] + self.params_last[vtp] - self.tied_params[vtp]


@dataclass(frozen=True)
class ModelSpec:
    """A model as the planner sees it."""

    name: str                      # preset name or path
    family: str                    # "bert" | "t5" | "vit" | "swin"
    precision: str                 # activation precision the bytes were computed for
    layer_types: tuple[LayerType, ...]
    layer_order: tuple[int, ...]   # layer_types index of each layer, in model order
    other: OtherModules
    hf_config: Mapping = field(default_factory=dict, compare=False, repr=False)  # config.to_dict()
    task: str = ""                 # e.g. "mlm", "text-classification", "seq2seq", "image-classification"
    seq_lens: tuple[int, ...] = ()  # tokens per sample (T5: encoder, decoder; vision: patches (+CLS) per stage)
    act_device: str = "cuda"       # device whose attention kernels the activation bytes describe ("cuda"/"cpu")

    @property
    def num_layers(self) -> int:
        return len(self.layer_order)

    def layer(self, i: int) -> LayerType:
        return self.layer_types[self.layer_order[i]]

    def valid_tp_degrees(self, max_tp: int = 1 << 20) -> list[int]:
        """TP degrees that every layer type accepts (one TP for the whole model)."""
        return [t for t in pow2_upto(max_tp) if all(lt.tp_ok(t) for lt in self.layer_types)]

    def params_total(self, vtp: int = 1) -> int:
        return sum(self.layer(i).params for i in range(self.num_layers)) + self.other.params_total(vtp)

    def train_flops_per_sample(self) -> float:
        """Forward + backward FLOPs per sample (backward = 2 x forward for GEMMs), no recompute."""
        fwd = sum(self.layer(i).fwd_flops for i in range(self.num_layers))
        fwd += self.other.fwd_flops_first + self.other.fwd_flops_last
        return 3.0 * fwd
