"""The engine's optional modes on CPU: DeepSpeed torch_autocast (fp32 weights, bf16 autocast)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from autotune.plan import Plan
from backends.data import SyntheticData
from backends.deepspeed.engine import build_engine
from backends.megatron.groups import build_parallel_groups, destroy_parallel_groups, init_distributed
from model_zoo.registry import load_hf_config
from model_zoo.runtime import get_adapter


@pytest.fixture
def world_of_one():
    """A one-process world on a free port, torn down afterwards with the environment as it was (train.py
    subprocesses of later tests inherit os.environ and would try the same port)."""
    saved = dict(os.environ)
    for key in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    init_distributed()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _losses(precision: str, autocast: bool, steps: int = 3) -> tuple[list[float], torch.dtype, dict]:
    adapter, config = get_adapter("bert"), load_hf_config("bert-test")
    plan = Plan.uniform(num_layers=adapter.num_layers(config), world_size=1, global_bsz=4, precision=precision)
    groups = build_parallel_groups(plan)
    torch.manual_seed(0)
    state = adapter.build_model(config, "mlm").state_dict()
    model = adapter.build_model(config, "mlm", state)
    trainer = build_engine(plan, groups, adapter.layer_sequence(model, "mlm"), lr=1e-3, autocast=autocast)
    data = SyntheticData(adapter, config, "mlm", plan, 0, 1)
    losses = [trainer.train_step(data.micro_batches(s)).loss for s in range(steps)]
    dtype = next(trainer.engine.module.parameters()).dtype
    cfg = trainer.ds_config
    trainer.destroy()
    destroy_parallel_groups()
    return losses, dtype, cfg


def test_autocast_mode_keeps_fp32_weights_and_tracks_fp32_training(world_of_one):
    ref, ref_dtype, _ = _losses("fp32", autocast=False)
    amp, amp_dtype, cfg = _losses("bf16", autocast=True)
    assert ref_dtype == amp_dtype == torch.float32
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not cfg["bf16"]["enabled"]
    assert amp == pytest.approx(ref, rel=2e-2)         # bf16 matmuls: same trajectory to bf16 precision
    assert amp != ref                                  # and autocast really ran in bf16
