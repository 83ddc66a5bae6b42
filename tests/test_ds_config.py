"""The DeepSpeed config's batch sizes use DeepSpeed's own data-parallel group (hand-computed)."""
from __future__ import annotations

from autotune.plan import Plan
from backends.deepspeed.config import make_ds_config


def test_uniform_plan_micro_batch_over_world_by_pp_tp():
    plan = Plan.uniform(num_layers=4, world_size=8, pp=2, tp=2, chunks=2, global_bsz=16)
    cfg = make_ds_config(plan)
    # dp = 8 / (2 * 2) = 2 replicas; 16 samples / (2 chunks * 2 replicas) = 4
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == \
        (16, 4, 2)


def test_layerwise_plan_micro_batch_over_ranks_identical_in_every_layer():
    plan = Plan.uniform(num_layers=4, world_size=4, chunks=2, global_bsz=8)
    plan.tp_sizes_enc = [1, 2, 4, 2]
    plan.validate(world_size=4, num_layers=4)
    cfg = make_ds_config(plan)
    # consecutive groups up to TP 4 on 4 ranks: no two ranks hold the same shard of the TP-4 layer, so
    # DeepSpeed's data-parallel group has 4 / 4 = 1 rank: 8 samples / (2 chunks * 1) = 4 per micro-batch
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    plan.tp_sizes_enc = [1, 2, 2, 2]
    cfg = make_ds_config(plan)        # 4 / 2 = 2 ranks: 8 / (2 * 2) = 2
    assert cfg["train_micro_batch_size_per_gpu"] == 2


def test_zero2_overlaps_reduction_only_with_ranks_to_reduce_with():
    # two replicas (8 / (4 tp)): reduce on a side stream into two buckets; one rank, or a TP group that
    # fills the world: nothing to overlap, so one bucket on the compute stream
    for world, tp, overlap in ((8, 4, True), (1, 1, False), (4, 4, False)):
        plan = Plan.uniform(num_layers=4, world_size=world, tp=tp, global_bsz=16, zero_stage=2)
        zero = make_ds_config(plan)["zero_optimization"]
        assert (zero["overlap_comm"], zero["contiguous_gradients"]) == (overlap, True)
    assert make_ds_config(Plan.uniform(num_layers=4, world_size=8, global_bsz=16, zero_stage=1))[
        "zero_optimization"]["overlap_comm"] is False
