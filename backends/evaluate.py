"""Evaluation under any plan (`train.py --eval-data PATH --eval-every N`): loss, and accuracy for
classification, over a whole evaluation set.

The layer sequence's loss function is swapped for `eval_stats(loss_fn)`, which returns
[loss x counted, correct, counted, counted if classification] per micro-batch; DeepSpeed runs it
where the loss runs (the last pipeline stage; every rank when pp = 1). Sums are exact in every
layout: TP ranks of one replica compute the same numbers, so only TP rank 0 contributes; each
data-parallel replica contributes its slice of every batch; one all-reduce over the world adds them
up. Samples that pad the last batch carry ignored labels and count nowhere.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from backends.data import IGNORE_INDEX, EvalData

StatsFn = Callable[[Any, torch.Tensor], torch.Tensor]


def eval_stats(loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> StatsFn:
    """Per micro-batch statistics in place of the mean loss `loss_fn(output, labels)`.

    Classification (one integer label per sample, logits [batch, classes]) is scored per sample;
    token-level tasks (MLM, seq2seq) by the loss over their non-ignored tokens (the loss functions
    already ignore -100, and vocab-parallel logits never need gathering).
    """

    def stats(output: Any, labels: torch.Tensor) -> torch.Tensor:
        valid = ~torch.isnan(labels) if labels.is_floating_point() else labels != IGNORE_INDEX
        n = valid.sum()
        classify = labels.dim() == 1 and not labels.is_floating_point() and torch.is_tensor(output)
        zero = torch.zeros((), device=labels.device)
        if int(n) == 0:
            return torch.zeros(4, device=labels.device)
        if labels.dim() == 1:                # one label per sample: score only the real ones
            out, lab = output[valid], labels[valid]
            loss = loss_fn(out, lab)
            correct = (out.argmax(-1) == lab).sum() if classify else zero
        else:
            loss, correct = loss_fn(output, labels), zero
        n = n.float()
        return torch.stack([loss.float() * n, correct.float(), n, n if classify else zero])

    return stats


def evaluate(trainer: Any, data: EvalData, loss_fn: Callable, tp_rank: int) -> dict:
    """Collective: {'eval_loss', 'eval_accuracy' (classification, else None), 'eval_samples'}."""
    from backends.deepspeed.engine import device

    stats = eval_stats(loss_fn)
    total = torch.zeros(4, dtype=torch.float64, device=device())
    for b in range(data.num_batches):
        part = trainer.eval_step(data.micro_batches(b), stats)
        if part is not None and tp_rank == 0:
            total += part.to(total.device, torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    loss_sum, correct, counted, classified = (float(x) for x in total)
    return {"eval_loss": loss_sum / counted if counted else None,
            "eval_accuracy": correct / classified if classified and classified == counted else None,
            "eval_samples": len(data.dataset)}
