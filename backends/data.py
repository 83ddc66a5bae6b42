"""Deterministic data: the same global batch at step k for every plan and world size.

The family adapter makes the global batch from (seed, step) on CPU; this module gives each rank
its part: data-parallel rank r takes the r-th contiguous slice (TP ranks of one replica, and all
stages of one pipeline, take the same slice) and cuts it into `chunks` micro-batches.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from autotune.plan import Plan
from model_zoo.adapter import Batch, FamilyAdapter


def dp_slice(batch: Batch, dp_rank: int, dp_size: int) -> Batch:
    n = _batch_len(batch)
    if n % dp_size:
        raise ValueError(f"global batch of {n} samples does not split over {dp_size} data-parallel ranks")
    per = n // dp_size
    return {k: v[dp_rank * per:(dp_rank + 1) * per] for k, v in batch.items()}


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
    """Global batch per step from the adapter; `micro_batches(step)` is this rank's share."""

    def __init__(self, adapter: FamilyAdapter, config: Any, task: str, plan: Plan, dp_rank: int, seed: int,
                 seq_len: int | None = None):
        self.adapter, self.config, self.task, self.plan = adapter, config, task, plan
        self.dp_rank, self.seed, self.seq_len = dp_rank, seed, seq_len

    def global_batch(self, step: int) -> Batch:
        return self.adapter.synthetic_batch(self.config, self.task, self.plan.global_bsz, self.seed, step,
                                            seq_len=self.seq_len)

    def micro_batches(self, step: int) -> list[tuple[Any, torch.Tensor]]:
        local = dp_slice(self.global_batch(step), self.dp_rank, self.plan.dp_deg)
        return [self.adapter.split_batch(mb, self.task) for mb in split_micro(local, self.plan.chunks)]

    def __iter__(self) -> Iterator[list[tuple[Any, torch.Tensor]]]:
        step = 0
        while True:
            yield self.micro_batches(step)
            step += 1
