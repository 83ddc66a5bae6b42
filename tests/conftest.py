"""Fixtures shared by the test modules."""
from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from backends.megatron.groups import init_distributed


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


@pytest.fixture
def ds_world(world_of_one):
    """DeepSpeed's communication backend over the one-process world (its optimizers ask it for the rank)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    yield
