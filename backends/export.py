"""Export a model trained under any plan back to the full Hugging Face layout (`train.py --export-hf DIR`).

The adapters convert the HF model *in place* (model_zoo/tp.py swaps nn.Linear/nn.Embedding for
Megatron-core layers under the same attribute names) and cut the layer sequence from its own
submodules, so the HF model object's parameter names are still the HF state-dict keys; only the
values are partial:

* TP: a tagged parameter (`tensor_model_parallel`, `partition_dim`) holds this rank's shard; the
  shards are all-gathered over the owning layer's `tp_group` (the vocabulary group for parameters
  that no Megatron layer owns, e.g. the MLM output bias) and concatenated; the vocabulary padding
  (zero rows) is cut off against the HF model's shapes.
* pipeline: a rank holds only its stage's layers; each stage's (tp 0, dp 0) rank sends the
  parameters it owns to rank 0, the first stage holding a tied weight wins.
* ZeRO-3: partitioned parameters are gathered with `deepspeed.zero.GatheredParameters`.

`capture_layout(model)` must run after `tensor_parallelize` and before the engine is built
(the engine re-tags replicated copies of tied weights); `gather_full_state_dict` is collective
(every rank calls it); `save_hf` runs on rank 0 only and writes atomically (temporary folder + rename).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# files of a checkpoint folder that belong to its tokenizer / processor and travel with an export
TOKENIZER_GLOBS = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "spiece.model", "sentencepiece*.model", "preprocessor_config.json", "processor_config.json")


@dataclass
class ExportLayout:
    """The HF names of a (converted) model's parameters and how each one is split over TP."""

    named: list[tuple[str, nn.Parameter]]        # every name, tied ones included, in model order
    shard: dict[int, tuple[int, Any]]            # id(param) -> (partition_dim, tp group)


def capture_layout(model: nn.Module, vocab_group: Any) -> ExportLayout:
    """Record names and TP splits of `model` (after tensor_parallelize, before layer_sequence/engine)."""
    owner_group: dict[int, Any] = {}
    for module in model.modules():
        group = getattr(module, "tp_group", None)
        if group is not None:
            for p in module.parameters(recurse=False):
                owner_group[id(p)] = group
    shard = {}
    named = list(model.named_parameters(remove_duplicate=False))
    for _, p in named:
        if getattr(p, "tensor_model_parallel", False):
            group = owner_group.get(id(p), vocab_group)
            if group is not None and group.size() > 1:
                shard[id(p)] = (int(p.partition_dim), group)
    return ExportLayout(named=named, shard=shard)


def _zero3_gather(p: nn.Parameter):
    if hasattr(p, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p], modifier_rank=None)
    return nullcontext()


def gather_full_state_dict(layout: ExportLayout, owned: set[int], *, first_of_stage: bool,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor] | None:
    """Collective: the full (unsharded, still vocab-padded) tensors by HF name on rank 0, None elsewhere.

    `owned`: ids of the parameters this rank trains (its pipeline stage's); `first_of_stage`: this
    rank sends its stage's tensors to rank 0 (one rank per stage, e.g. tp rank 0 of dp rank 0).
    Ranks of one TP group own the same parameters, so their all-gathers line up.
    """
    local: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor | None] = {}     # tied names share one gather (and one copy)
    for name, p in layout.named:
        if id(p) not in owned:
            continue
        if id(p) not in done:
            with _zero3_gather(p):            # every rank takes part in the gathers ...
                t = p.detach()
                if id(p) in layout.shard:
                    dim, group = layout.shard[id(p)]
                    t = t.contiguous()
                    parts = [torch.empty_like(t) for _ in range(group.size())]
                    dist.all_gather(parts, t, group=group)
                    t = torch.cat(parts, dim=dim)
                # ... but only the rank that sends its stage keeps a host copy
                done[id(p)] = t.to("cpu", dtype=dtype, copy=True) if first_of_stage else None
        if first_of_stage:
            local[name] = done[id(p)]
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local if first_of_stage else {}, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    full: dict[str, torch.Tensor] = {}
    for part in gathered:                    # rank order = stage order: the first stage's tied copy wins
        for name, t in part.items():
            full.setdefault(name, t)
    return full


def to_hf_state_dict(full: dict[str, torch.Tensor], hf_model: nn.Module) -> dict[str, torch.Tensor]:
    """Fit gathered tensors to a fresh HF model: cut vocabulary padding, fill tied names from their twin."""
    twins: dict[int, tuple[nn.Parameter, list[str]]] = {}     # one entry per parameter, all its (tied) names
    for name, p in hf_model.named_parameters(remove_duplicate=False):
        twins.setdefault(id(p), (p, []))[1].append(name)
    out: dict[str, torch.Tensor] = {}
    missing = []
    for target, names in twins.values():
        source = next((n for n in names if n in full), None)
        if source is None:
            missing.extend(names)
            continue
        t = full[source]
        if t.shape != target.shape:
            if t.dim() != target.dim() or any(a < b for a, b in zip(t.shape, target.shape)):
                raise ValueError(f"{source}: gathered shape {tuple(t.shape)} does not fit {tuple(target.shape)}")
            t = t[tuple(slice(0, s) for s in target.shape)]     # vocabulary padding
        for n in names:
            out[n] = t.to(target.dtype).contiguous()
    if missing:
        raise ValueError(f"export: no trained value for {', '.join(sorted(missing))}")
    return out


def save_hf(hf_model: nn.Module, state: dict[str, torch.Tensor], out_dir: str | os.PathLike,
            tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Load `state` into `hf_model` and save_pretrained it (plus tokenizer files) atomically to `out_dir`."""
    result = hf_model.load_state_dict(state, strict=False)
    buffers = {n for n, _ in hf_model.named_buffers()}
    missing = [k for k in result.missing_keys if k not in buffers]
    if missing or result.unexpected_keys:
        raise ValueError(f"export: missing {missing}, unexpected {result.unexpected_keys}")
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)              # mkdtemp makes it private; the export is a normal folder
    try:
        hf_model.save_pretrained(str(tmp))
        if tokenizer_dir is not None:
            src = Path(tokenizer_dir)
            for pattern in TOKENIZER_GLOBS:
                for f in src.glob(pattern):
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
