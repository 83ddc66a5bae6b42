"""Layer-sequence entries as modules DeepSpeed can run, with per-layer activation checkpointing.

Both the pp=1 model and the PipelineModule are built from these, so a plan's `checkpoint` flags
mean the same thing with and without pipelining: exactly the flagged Transformer layers recompute
their forward in backward. Recomputation uses DeepSpeed's checkpoint function, which saves and
restores the model-parallel RNG tracker as well as the default generators (same dropout masks).
Pipeline stages use its non-reentrant variant: DeepSpeed's pipeline runs one backward call per float
tensor a stage sends on (T5 sends several), and only the non-reentrant variant (which keeps the
recomputed activations until the graph is freed) survives a second call; the reentrant one is kept
for pp = 1, where ZeRO-3's parameter gathering needs it.
"""
from __future__ import annotations

from typing import Any

import torch
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt
from torch import nn

from model_zoo.adapter import LayerSequence, PipeEntry
from model_zoo.common import mask_answers, put_mask_answers


class EntryModule(nn.Module):
    """A PipeEntry as a module: `forward_fn(module, inputs)` or `module(inputs)`.

    Layer entries take a tuple, but DeepSpeed's pipeline hands a stage a received 1-tuple as a bare
    tensor (and so does its TP-partitioned activation transfer); `tuple_inputs` wraps it back. Under
    --cuda-graphs a layer entry holds its graph (`graphed`, backends/deepspeed/graphs.py, a plain attribute
    so the module tree and its state dict stay as they are) and replays it where the inputs match.
    """

    graphed = None

    def __init__(self, entry: PipeEntry, tuple_inputs: bool = False):
        super().__init__()
        self.inner = entry.module
        self.forward_fn = entry.forward_fn
        self.tuple_inputs = tuple_inputs

    def forward(self, inputs: Any) -> Any:
        if self.tuple_inputs and torch.is_tensor(inputs):
            inputs = (inputs,)
        g = self.graphed
        if g is not None and self.training and torch.is_grad_enabled() and g.matches(inputs):
            return g(inputs)
        return self.forward_fn(self.inner, inputs) if self.forward_fn else self.inner(inputs)


class Recompute(nn.Module):
    """Run `inner` without keeping its activations; recompute them during backward."""

    def __init__(self, inner: nn.Module, reentrant: bool = True):
        super().__init__()
        self.inner = inner
        self.reentrant = reentrant

    def forward(self, inputs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(inputs)
        single = torch.is_tensor(inputs)
        args = (inputs,) if single else tuple(inputs)

        returned_tuple: list[bool] = []
        answers: list = []

        def run(*xs):
            # The recompute runs on detached copies of the inputs: give them the attention mask's answer
            # (model_zoo.common.layer_padding_mask) as the forward saw it. Only the answers are kept: a
            # closure over the inputs themselves would hold every layer's input until the whole backward
            # ends (the checkpoint keeps run_function; seen on T5-large, +31 MB a sample fully checkpointed).
            if answers:
                put_mask_answers(xs, answers)
            out = self.inner(xs[0] if single else tuple(xs))
            if not answers:
                answers.extend(mask_answers(xs))
            returned_tuple.append(isinstance(out, tuple))
            return out

        ckpt = ds_ckpt.checkpoint if self.reentrant else ds_ckpt.non_reentrant_checkpoint
        out = ckpt(run, *args)
        # DeepSpeed's checkpoint hands back a 1-tuple's element bare; the next entry expects the tuple
        return (out,) if returned_tuple[0] and torch.is_tensor(out) else out


def entry_modules(seq: LayerSequence, checkpoint: list[int], wrap=None) -> list[nn.Module]:
    """One module per entry; Transformer layer i is wrapped in Recompute when checkpoint[i] is 1, then in
    `wrap(module, i)` when given (per-layer TP: the layer's activation layout changes)."""
    if len(checkpoint) != seq.num_layers:
        raise ValueError(f"{len(checkpoint)} checkpoint flags for {seq.num_layers} layers")
    mods: list[nn.Module] = []
    for e in seq.embed:
        mods.append(EntryModule(e) if e.forward_fn else e.module)
    for i, (e, flag) in enumerate(zip(seq.layers, checkpoint)):
        m = EntryModule(e, tuple_inputs=True)
        m = Recompute(m) if flag else m
        mods.append(wrap(m, i) if wrap else m)
    for e in seq.head:
        mods.append(EntryModule(e) if e.forward_fn else e.module)
    return mods


class SequentialWithLoss(nn.Module):
    """The pp=1 model: the entries in order, closed by the loss (one module for DeepSpeedEngine).

    Tied entries hold the same module object, so the tied weight is one parameter here.
    """

    def __init__(self, seq: LayerSequence, checkpoint: list[int], wrap=None):
        super().__init__()
        self.entries = nn.ModuleList(entry_modules(seq, checkpoint, wrap))
        self.loss_fn = seq.loss_fn

    def forward(self, inputs: Any, labels: torch.Tensor) -> torch.Tensor:
        x = inputs
        for m in self.entries:
            x = m(x)
        return self.loss_fn(x, labels)
