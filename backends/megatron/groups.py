"""Plan -> Megatron-core `parallel_state` process groups (TP, PP, DP).

Rank layout follows Galvatron: pipeline stage k owns the contiguous rank block
[k*W/pp, (k+1)*W/pp); inside a stage, TP ranks are consecutive (tp_consecutive_flags=1, Megatron's
default order "tp-cp-ep-dp-pp") or strided with data-parallel ranks consecutive (flag 0, order
"dp-tp-pp"). Layers always receive their TP group explicitly (`ParallelGroups.tp_groups`), never
through the global state, so that per-layer TP degrees can be added later.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from autotune.plan import Plan, PlanError
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
    """What this runtime can run today; a plan beyond it gets an error naming the fix."""
    if not plan.uniform_tp:
        raise PlanError("plan has per-layer TP degrees or mixed tp_consecutive_flags; the runtime runs one TP "
                        "degree for all layers so far: search with a single TP degree (fine_grained_mode=0)")
    if plan.vtp != plan.tp_sizes_enc[0]:
        raise PlanError(f"plan key 'vtp'={plan.vtp} differs from the layer TP {plan.tp_sizes_enc[0]}; the runtime "
                        f"uses the layer TP group for embeddings and heads: set vtp to {plan.tp_sizes_enc[0]}")


def build_parallel_groups(plan: Plan) -> ParallelGroups:
    """Create Megatron-core's parallel state for `plan` (destroying any earlier one) and describe it."""
    check_executable(plan)
    world = dist.get_world_size()
    plan.validate(world_size=world)
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


def _check_layout(g: ParallelGroups) -> None:
    """Galvatron's layout: stage k = contiguous rank block; TP consecutive or strided inside it."""
    block = g.world_size // g.pp
    assert g.rank // block == g.pp_rank, (g.rank, g.pp_rank)
    tp_ranks = g.ranks(g.tp_group)
    step = 1 if g.tp_consecutive else g.dp
    assert all(b - a == step for a, b in zip(tp_ranks, tp_ranks[1:])), (tp_ranks, g.tp_consecutive)


def destroy_parallel_groups() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
