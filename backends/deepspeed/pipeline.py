"""Plan -> DeepSpeed PipelineModule with the plan's exact stage partition.

Stage k runs the entries [parts[k], parts[k+1]): the embedding entries on the first stage, then
pp_division[k] Transformer layers per stage, the head entries on the last stage, and the loss there.
DeepSpeed's pipeline grid is given the same rank layout as Megatron-core's parallel_state
(stage-major; TP consecutive or strided), and this is checked.
"""
from __future__ import annotations

import torch
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import ProcessTopology
from torch import nn

from autotune.plan import Plan
from backends.deepspeed.layers import EntryModule, Recompute
from backends.megatron.groups import ParallelGroups
from model_zoo.adapter import LayerSequence


class _Prebuilt(nn.Module):
    """TiedLayerSpec wants a class to build; this one hands back a module built (and sharded) already."""

    def __new__(cls, module: nn.Module):  # type: ignore[misc]
        return module


def stage_bounds(plan: Plan, seq: LayerSequence) -> list[int]:
    """Entry index where each stage starts, plus the end: embeddings on stage 0, head on the last."""
    parts = [0]
    for k, n in enumerate(plan.pp_division):
        parts.append(parts[-1] + n + (len(seq.embed) if k == 0 else 0))
    parts[-1] += len(seq.head)
    assert parts[-1] == len(seq.entries)
    return parts


def topology(groups: ParallelGroups) -> ProcessTopology:
    """DeepSpeed's grid with Megatron's rank order: the last axis varies fastest."""
    if groups.layerwise is not None:
        return ProcessTopology(*groups.layerwise.lw.grid())
    if groups.tp_consecutive:
        return ProcessTopology(axes=["pipe", "data", "model"], dims=[groups.pp, groups.dp, groups.tp])
    return ProcessTopology(axes=["pipe", "model", "data"], dims=[groups.pp, groups.tp, groups.dp])


class PlanPipelineModule(PipelineModule):
    """PipelineModule whose partition is the plan's `pp_division`, not one of DeepSpeed's heuristics."""

    def __init__(self, layers: list, parts: list[int], **kwargs):
        self._plan_parts = list(parts)
        super().__init__(layers, partition_method="plan", **kwargs)

    def _synchronize_tied_weights(self) -> None:
        # DeepSpeed broadcasts the tied weights in place; outside no_grad autograd records the
        # broadcast on the parameter (warning "c10d::broadcast_ ... autograd kernel was not registered").
        with torch.no_grad():
            super()._synchronize_tied_weights()

    def _partition_layers(self, method: str = "plan") -> None:
        self.parts = list(self._plan_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def build_pipeline_module(plan: Plan, groups: ParallelGroups, seq: LayerSequence, wrap=None) -> PlanPipelineModule:
    """`wrap(module, i)` (optional) wraps Transformer layer i's module (per-layer TP layout changes)."""
    specs: list = []
    layer_i = 0
    for e in seq.entries:
        module = e.module
        if e.kind == "layer":
            module = EntryModule(e, tuple_inputs=True)
            if plan.checkpoint[layer_i]:
                module = Recompute(module, reentrant=False)
            if wrap is not None:
                module = wrap(module, layer_i)
            layer_i += 1
        if e.tie_key:
            specs.append(TiedLayerSpec(e.tie_key, _Prebuilt, module, forward_fn=e.forward_fn,
                                       tied_weight_attr=[e.tied_weight_attr]))
        elif e.forward_fn and e.kind != "layer":
            specs.append(EntryModule(e))
        else:
            specs.append(module)
    pipe = PlanPipelineModule(specs, stage_bounds(plan, seq), topology=topology(groups), loss_fn=seq.loss_fn)
    _check_grid(pipe, groups)
    tag_gradient_norm_owners(pipe, groups)
    return pipe


def _check_grid(pipe: PipelineModule, groups: ParallelGroups) -> None:
    grid = pipe.mpu()
    assert sorted(grid.get_data_parallel_group_ranks()) == sorted(groups.ranks(groups.dp_group)), "DP layout"
    assert grid.get_stage_id() == groups.pp_rank, "PP layout"
    if groups.tp > 1 and groups.layerwise is None:
        assert sorted(grid.slice_group) == sorted(groups.ranks(groups.tp_group)), "TP layout"


def tag_gradient_norm_owners(module: nn.Module, groups: ParallelGroups) -> None:
    """Make every DeepSpeed gradient-norm path count each weight exactly once across TP x PP.

    DeepSpeed counts a parameter if it is tagged model-parallel or the rank is rank 0 of its
    model-parallel group. With a pipeline that group spans stages, so without tags the replicated
    weights (LayerNorms, biases) of later stages would be missed; and a tied weight's second copy
    must not count. Tags: TP-sharded weights everywhere, replicated weights on TP rank 0, never
    the non-owner copy of a tied weight (`ds_pipe_replicated`). Per-layer TP plans: see
    backends/megatron/layerwise.py (shard_owner).
    """
    if groups.layerwise is not None:
        from backends.megatron.layerwise import tag_layerwise_owners

        tag_layerwise_owners(module)
        return
    tp_rank = groups.tp_rank
    for p in module.parameters():
        if getattr(p, "ds_pipe_replicated", False):
            p.tensor_model_parallel = False
            p.model_parallel = False
        else:
            p.model_parallel = bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0
