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
