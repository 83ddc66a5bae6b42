"""Deterministic data: the same global batch at step k for every plan and world size.

The family adapter makes the global batch on CPU from (seed, step) -- synthetic samples, or the
records of a local dataset file in a seeded per-epoch order; this module gives each rank its part:
data-parallel rank r takes the r-th contiguous slice (TP ranks of one replica, and all stages of
one pipeline, take the same slice) and cuts it into `chunks` micro-batches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from autotune.plan import Plan
from model_zoo.adapter import Batch, FamilyAdapter
from model_zoo.base import IGNORE_INDEX


def dp_slice(batch: Batch, dp_rank: int, dp_size: int) -> Batch:
    n = _batch_len(batch)
    if n % dp_size:
        raise ValueError(f"global batch of {n} samples does not split over {dp_size} data-parallel ranks")
    per = n // dp_size
    return {k: v[dp_rank * per:(dp_rank + 1) * per] for k, v in batch.items()}


def fine_share(batch: Batch, members: list[int], parts: int) -> Batch:
    """Per-layer TP: slices `members` (in order) of `parts` equal slices of a micro-batch, concatenated."""
    pieces = [dp_slice(batch, m, parts) for m in members]
    return {k: torch.cat([p[k] for p in pieces]) for k in batch}


def split_micro(batch: Batch, chunks: int) -> list[Batch]:
    n = _batch_len(batch)
    if n % chunks:
        raise ValueError(f"{n} samples per replica do not split into {chunks} micro-batches")
    per = n // chunks
    return [{k: v[i * per:(i + 1) * per] for k, v in batch.items()} for i in range(chunks)]


def _batch_len(batch: Batch) -> int:
    sizes = {v.shape[0] for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the number of samples: {sizes}")
    return sizes.pop()


class SyntheticData:
    """Synthetic global batch per step from the adapter; `micro_batches(step)` is this rank's share.

    `share` (set from ParallelGroups.batch_share for per-layer TP plans): the global batch is cut into
    `chunks` micro-batches and each of those into B fine slices (B ranks per pipeline stage); the rank
    takes the slices of its vocabulary TP group's members (backends/megatron/layerwise.py).
    """

    share: tuple[list[int], int] | None = None

    def __init__(self, adapter: FamilyAdapter, config: Any, task: str, plan: Plan, dp_rank: int, seed: int,
                 seq_len: int | None = None):
        self.adapter, self.config, self.task, self.plan = adapter, config, task, plan
        self.dp_rank, self.seed, self.seq_len = dp_rank, seed, seq_len

    def global_batch(self, step: int) -> Batch:
        return self.adapter.synthetic_batch(self.config, self.task, self.plan.global_bsz, self.seed, step,
                                            seq_len=self.seq_len)

    def micro_batches(self, step: int) -> list[tuple[Any, torch.Tensor]]:
        if self.share is not None:
            members, parts = self.share
            return [self.adapter.split_batch(fine_share(mb, members, parts), self.task)
                    for mb in split_micro(self.global_batch(step), self.plan.chunks)]
        local = dp_slice(self.global_batch(step), self.dp_rank, self.plan.dp_deg)
        return [self.adapter.split_batch(mb, self.task) for mb in split_micro(local, self.plan.chunks)]

    def __iter__(self) -> Iterator[list[tuple[Any, torch.Tensor]]]:
        step = 0
        while True:
            yield self.micro_batches(step)
            step += 1


# files that mark a folder written by Dataset(Dict).save_to_disk
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json", "dataset_info.json")
# file suffix -> `datasets` builder that reads it locally
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
                 ".arrow": "arrow"}


def load_records(path: str, flag: str = "--data"):
    """A local dataset: a `Dataset.save_to_disk` folder, an image-folder tree (one sub-folder of images
    per class, read by the `datasets` "imagefolder" builder: records `image`, `label`), or a
    .json/.jsonl/.csv/.parquet/.txt/.arrow file."""
    import datasets

    p = Path(path).expanduser()
    if p.is_dir():
        if any((p / f).is_file() for f in SAVED_DATASET_FILES):
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return ds
    builder = FILE_BUILDERS.get(p.suffix.lower())
    if not p.is_file() or builder is None:
        raise ValueError(f"{flag} {path}: give a save_to_disk folder, an image-folder tree or a "
                         f"{', '.join(FILE_BUILDERS)} file")
    return datasets.load_dataset(builder, data_files=str(p), split="train")


class FileData(SyntheticData):
    """Records of a local dataset in a seeded order that is reshuffled every epoch.

    Sample position p of the run (step k holds positions [k*G, (k+1)*G)) is record
    perm(seed, p // N)[p % N]: identical on every rank and for every plan. `tokenize` (text -> ids)
    is applied to records without 'input_ids'.
    """

    def __init__(self, adapter: FamilyAdapter, config: Any, task: str, plan: Plan, dp_rank: int, seed: int,
                 dataset, seq_len: int | None = None, tokenize=None):
        super().__init__(adapter, config, task, plan, dp_rank, seed, seq_len)
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset, self.tokenize = dataset, tokenize
        self._perms: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms = {epoch: torch.randperm(len(self.dataset), generator=g)}
        return self._perms[epoch]

    def global_batch(self, step: int) -> Batch:
        G, N = self.plan.global_bsz, len(self.dataset)
        idx = [int(self._order(p // N)[p % N]) for p in range(step * G, (step + 1) * G)]
        return self._collate([self.dataset[i] for i in idx], step)

    def _collate(self, records: list[dict], step: int) -> Batch:
        if self.tokenize is not None:
            records = [self.tokenize(r) if "input_ids" not in r else r for r in records]
        return self.adapter.collate(self.config, self.task, records, self.seed, step, seq_len=self.seq_len)


class EvalData(FileData):
    """An evaluation set in its own order, in batches of the training global batch (the pipeline's
    buffers keep the training shapes); the last batch is filled up with records from the start whose
    labels are ignored (-100, or NaN for regression), so every record counts exactly once."""

    @property
    def num_batches(self) -> int:
        return -(-len(self.dataset) // self.plan.global_bsz)

    def global_batch(self, step: int) -> Batch:
        G, N = self.plan.global_bsz, len(self.dataset)
        idx = [p % N for p in range(step * G, (step + 1) * G)]
        batch = self._collate([self.dataset[i] for i in idx], step)
        real = min(G, N - step * G)
        if real < G:
            labels = batch["labels"].clone()
            labels[real:] = float("nan") if labels.is_floating_point() else IGNORE_INDEX
            batch["labels"] = labels
        return batch
