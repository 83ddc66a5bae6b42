"""Pieces the family adapters share: deterministic generators, loss helpers, FLOPs."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_bidirectional_mask

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}   # plan precision -> dtype


def batch_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for the global batch of `step`: a function of (seed, step) only."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


def record_label(record: dict) -> int | float:
    for key in ("labels", "label"):
        if key in record:
            return record[key]
    raise KeyError(f"record has no 'label' or 'labels' field (fields: {', '.join(record)})")


def classification_loss(num_labels: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """HF's sequence/image classification loss: MSE for one label, cross entropy otherwise."""

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float().view(-1, num_labels), labels.view(-1))

    return loss_fn


def encoder_layer_flops(seq: int, hidden: int, ffn: int, kv_seq: int | None = None) -> float:
    """Forward FLOPs of one self-attention + MLP layer per sample (2 per multiply-add)."""
    kv = seq if kv_seq is None else kv_seq
    proj = 2 * seq * hidden * hidden * 4          # q, k, v, out
    attn = 2 * seq * kv * hidden * 2              # scores and weighted sum
    mlp = 2 * seq * hidden * ffn * 2
    return float(proj + attn + mlp)


MASK_ANSWER = "_masks_nothing"   # attribute of a 2D attention mask: True when it masks nothing


def _view(t: torch.Tensor) -> tuple:
    return t.storage_offset(), tuple(t.shape), tuple(t.stride())


def get_mask_answer(t: Any) -> bool | None:
    """The answer a mask tensor carries, or that an alias of it left on their shared storage: DeepSpeed's
    ZeRO-3 hooks hand every module a detached alias of its inputs, which has no attributes of its own (each
    layer read the mask back before). The storage's answer holds for the same view at the same version."""
    if not torch.is_tensor(t):
        return None
    answer = getattr(t, MASK_ANSWER, None)
    if answer is None and t.device.type != "meta" and not t.is_inference():
        version, kept = getattr(t.untyped_storage(), MASK_ANSWER, {}).get(_view(t), (None, None))
        answer = kept if version == t._version else None
    return answer


def set_mask_answer(t: torch.Tensor, answer: bool) -> None:
    """Keep `answer` on the tensor and, for its aliases, on its storage (by view and version: an in-place
    write or another view of the storage does not take it)."""
    setattr(t, MASK_ANSWER, answer)
    if t.device.type != "meta" and not t.is_inference():       # inference tensors have no version counter
        storage = t.untyped_storage()
        if getattr(storage, MASK_ANSWER, None) is None:
            setattr(storage, MASK_ANSWER, {})
        getattr(storage, MASK_ANSWER)[_view(t)] = (t._version, answer)


def answer_on_host(mask: torch.Tensor) -> torch.Tensor:
    """Record on a host-side 2D attention mask whether it masks anything (free on the CPU). The answer
    travels with the mask to the device (`carry_mask_answer`) and into recomputed layers (`mask_answers`),
    so that `layer_padding_mask` never reads it back from the GPU. Returns the mask."""
    if torch.is_tensor(mask) and mask.device.type == "cpu" and mask.dim() == 2:
        set_mask_answer(mask, bool(mask.all()))
    return mask


def carry_mask_answer(src: Any, dst: Any) -> Any:
    """Copy the answer `answer_on_host` (or a layer's read-back) left on `src` to `dst`, a copy of the same
    values (the mask moved to the device). Returns dst."""
    put_mask_answers((dst,), mask_answers((src,)))
    return dst


def mask_answers(xs: tuple) -> list:
    """The answers (or None) that the tensors of `xs` carry, by position: plain values, so that keeping them
    (a recomputed layer does, until its backward) keeps no tensor alive."""
    return [get_mask_answer(x) for x in xs]


def put_mask_answers(xs: tuple, answers: list) -> None:
    """Set `answers` (mask_answers of the same inputs) on copies of them, e.g. a recompute's detached inputs."""
    for x, answer in zip(xs, answers):
        if answer is not None and torch.is_tensor(x):
            set_mask_answer(x, answer)


def layer_padding_mask(config: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                       encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor | None:
    """The padding mask a runtime layer hands HF attention: what create_bidirectional_mask returns (None
    where nothing is masked, so SDPA may take flash attention; else bool [batch, 1, queries, keys]) without
    its host synchronisation in every layer. HF reads back from the GPU whether the 2D mask masks anything;
    HF's own models do that once per forward, our layers (each builds its mask, so that only the 2D mask
    travels between pipeline stages) did it once per layer, and a host that waits for the GPU 24 times a
    forward cannot queue work ahead of it. The answer is kept on the mask tensor, which every layer of a
    stage shares. train.py's batches bring it from the host (`answer_on_host` in the adapters' split_batch,
    `carry_mask_answer` on the way to the device, `mask_answers` into a recomputed layer), so a stage asks
    only for a mask received from the previous pipeline stage: once per micro-batch there. SDPA with a 2D
    mask only; anything else goes to HF, and so does a layer under torch.compile (HF then
    builds the mask without asking, so the graph does not break)."""
    if (attention_mask is None or attention_mask.dim() != 2 or torch.compiler.is_compiling()
            or getattr(config, "_attn_implementation", None) != "sdpa"):
        return create_bidirectional_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                         encoder_hidden_states=encoder_hidden_states)
    masks_nothing = get_mask_answer(attention_mask)
    if masks_nothing is None:
        masks_nothing = bool(attention_mask.all())     # the one synchronisation (none on the host)
        set_mask_answer(attention_mask, masks_nothing)
    if masks_nothing:
        return None
    batch, keys = attention_mask.shape
    return attention_mask.bool()[:, None, None, :].expand(batch, 1, inputs_embeds.shape[1], keys).contiguous()
