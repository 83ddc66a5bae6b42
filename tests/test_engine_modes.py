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


def _sequence(n: int):
    from model_zoo.adapter import LayerSequence, PipeEntry

    layers = [PipeEntry(module=torch.nn.Linear(2, 2), kind="layer") for _ in range(n)]
    return LayerSequence(embed=[], layers=layers, head=[], loss_fn=lambda x, y: x.sum())


def test_cuda_graph_modes_leave_checkpointed_layers_eager():
    """A checkpointed layer recomputes inside backward, over CUDA-graph outputs still in use (T5-large on an
    H100 failed so, compiled with or without graphs): under a graph mode it stays eager; other modes compile
    every layer."""
    from backends.deepspeed.engine import compile_layers

    plan = Plan.uniform(num_layers=4, world_size=1, checkpoint=[1, 0, 1, 0])
    seq = _sequence(4)
    compile_layers(plan, seq, "reduce-overhead")
    assert [e.module._compiled_call_impl is not None for e in seq.layers] == [False, True, False, True]
    seq = _sequence(4)
    compile_layers(plan, seq, "default")
    assert all(e.module._compiled_call_impl is not None for e in seq.layers)


def test_cuda_graph_modes_refused_with_pipelines():
    from backends.deepspeed.engine import check_compile_mode

    plan = Plan.uniform(num_layers=4, world_size=2, pp=2)
    with pytest.raises(ValueError, match="pp > 1.*--compile default"):
        check_compile_mode(plan, "reduce-overhead")
    check_compile_mode(plan, "default")
    check_compile_mode(Plan.uniform(num_layers=4, world_size=1), "max-autotune")
