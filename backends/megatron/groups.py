"""Plan -> Megatron-core `parallel_state` process groups (TP, PP, DP).

Rank layout follows Galvatron: pipeline stage k owns the contiguous rank block
[k*W/pp, (k+1)*W/pp); inside a stage, TP ranks are consecutive (tp_consecutive_flags=1, Megatron's
default order "tp-cp-ep-dp-pp") or strided with data-parallel ranks consecutive (flag 0, order
"dp-tp-pp"). Layers always receive their TP group explicitly (`ParallelGroups.tp_groups`), never
through the global state. Plans with per-layer TP degrees or layouts (or vtp != layer TP) get one
group per layout from backends/megatron/layerwise.py (`ParallelGroups.layerwise`).
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from autotune.plan import Plan, PlanError
from backends.megatron.layerwise import LayerwiseLayout, RankGroups, build_rank_groups, needs_layerwise
from model_zoo.adapter import TPGroups

ORDER_TP_CONSECUTIVE = "tp-cp-ep-dp-pp"
ORDER_TP_STRIDED = "dp-tp-pp"


def megatron_order(tp_consecutive: bool) -> str:
    return ORDER_TP_CONSECUTIVE if tp_consecutive else ORDER_TP_STRIDED


@dataclass
class ParallelGroups:
    """This rank's place in the plan's grid and the groups it belongs to."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_consecutive: bool
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    tp_groups: TPGroups
    layerwise: RankGroups | None = None       # per-layer TP: every layout's groups (None: uniform plan)

    @property
    def stage_leader(self) -> bool:
        """One rank per pipeline stage (it holds TP shard 0 of every layer)."""
        if self.layerwise is not None:
            return self.layerwise.j == 0
        return self.tp_rank == 0 and self.dp_rank == 0

    @property
    def batch_share(self) -> tuple[list[int], int] | None:
        """Per-layer TP: (fine slices of a micro-batch this rank's data holds, slices per micro-batch); see
        backends/data.py. None for uniform plans (the data-parallel slice)."""
        if self.layerwise is None:
            return None
        lw = self.layerwise.lw
        return lw.vocab.members(self.layerwise.j, lw.B), lw.B

    @property
    def rng_rank(self) -> int:
        """Offset of the model-parallel RNG seed: distinct inside every layer's TP group."""
        return self.layerwise.j if self.layerwise is not None else self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def ranks(self, group: Any) -> list[int]:
        return dist.get_process_group_ranks(group)


def init_distributed(timeout_minutes: int = 30) -> None:
    """Join the job's process group (env:// from deepspeed/torchrun), or make a world of 1 for `python train.py`."""
    if dist.is_initialized():
        return
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set; launch with deepspeed or torchrun")
        os.environ["MASTER_PORT"] = str(_free_port())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_executable(plan: Plan) -> None:
    """What this runtime can run; a plan beyond it gets an error naming the fix."""
    if needs_layerwise(plan) and plan.world_size is not None:
        LayerwiseLayout.from_plan(plan).check(plan)


def build_parallel_groups(plan: Plan) -> ParallelGroups:
    """Create Megatron-core's parallel state for `plan` (destroying any earlier one) and describe it."""
    world = dist.get_world_size()
    plan.validate(world_size=world)
    check_executable(plan)
    if needs_layerwise(plan):
        return _build_layerwise_groups(plan, world)
    tp, pp = plan.tp_sizes_enc[0], plan.pp_deg
    consecutive = bool(plan.tp_consecutive_flags[0]) if plan.num_layers else True
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 order=megatron_order(consecutive), create_gloo_process_groups=False)
    tp_group = ps.get_tensor_model_parallel_group()
    groups = ParallelGroups(
        world_size=world, rank=dist.get_rank(), tp=tp, pp=pp, dp=world // (tp * pp), tp_consecutive=consecutive,
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(), tp_group=tp_group, pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        tp_groups=TPGroups(layers=[tp_group] * plan.num_layers, vocab=tp_group))
    _check_layout(groups)
    return groups


def _build_layerwise_groups(plan: Plan, world: int) -> ParallelGroups:
    """Per-layer TP: Megatron's global state gets TP 1 (layers get their groups explicitly); DeepSpeed's
    data-parallel group is the set of ranks holding identical parameters in every layer."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=plan.pp_deg,
                                 create_gloo_process_groups=False)
    lw = LayerwiseLayout.from_plan(plan)
    rank = dist.get_rank()
    rg = build_rank_groups(lw, rank)
    # tp/tp_rank/tp_group: the vocabulary layers' (what evaluation de-duplicates on); dp: DeepSpeed's group
    return ParallelGroups(
        world_size=world, rank=rank, tp=lw.vocab.tp, pp=plan.pp_deg, dp=lw.zero_dp,
        tp_consecutive=lw.vocab.consecutive, tp_rank=lw.vocab.position(rg.j, lw.B), pp_rank=rg.stage,
        dp_rank=lw.data_index(rg.j), tp_group=rg.tp[lw.vocab],
        pp_group=ps.get_pipeline_model_parallel_group(), dp_group=rg.dp_group,
        tp_groups=TPGroups(layers=[rg.layer_group(i) for i in range(plan.num_layers)], vocab=rg.tp[lw.vocab]),
        layerwise=rg)


def _check_layout(g: ParallelGroups) -> None:
    """Galvatron's layout: stage k = contiguous rank block; TP consecutive or strided inside it."""
    block = g.world_size // g.pp
    assert g.rank // block == g.pp_rank, (g.rank, g.pp_rank)
    tp_ranks = g.ranks(g.tp_group)
    step = 1 if g.tp_consecutive else g.dp
    assert all(b - a == step for a, b in zip(tp_ranks, tp_ranks[1:])), (tp_ranks, g.tp_consecutive)


def destroy_parallel_groups() -> None:
    """Megatron's state and every process group but the default one.

    destroy_model_parallel only drops Megatron's references; a process group lives in torch's registry
    until destroyed, a gloo one with its worker threads and sockets (NCCL: its communicator). A process
    that builds plan after plan (the many-plans tests, the sweeps, the profilers) piled them up: about
    60 threads a layer-wise plan on each of 4 gloo ranks, and each new plan ran slower (1.5 s alone,
    up to 69 s as the 27th plan of a launch on 2 cores).
    """
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    for name, value in list(vars(ps).items()):     # what destroy_model_parallel leaves (0.16: the partial-DP group)
        if isinstance(value, dist.ProcessGroup):
            setattr(ps, name, None)
    if dist.is_initialized():
        from torch.distributed.distributed_c10d import _world  # the registry; torch has no public list

        for group in [g for g in _world.pg_map if g is not dist.GroupMember.WORLD]:
            dist.destroy_process_group(group)
    gc.collect()    # the engine just dropped holds groups in reference cycles: free their threads now
