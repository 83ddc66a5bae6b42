"""Seeds and the model-parallel RNG tracker, Megatron's scheme on any device.

Megatron-core's own tracker reads CUDA generator state only. DeepSpeed's tracker (same API: add,
fork, get_states, set_states) goes through its accelerator, so it works on CPU as on GPU, and
DeepSpeed's activation checkpointing already saves and restores it when a layer is recomputed.
We seed it the Megatron way:
- default generator: seed + 100 * pipeline rank (identical across TP ranks, so dropout on
  replicated activations matches inside a TP group);
- model-parallel generator: seed + 2718 + TP rank (differs across TP ranks, for dropout on
  partitioned activations such as attention probabilities); TP code runs that under `tracker.fork()`.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

MODEL_PARALLEL_RNG = "model-parallel-rng"


def get_rng_tracker():
    return ds_ckpt.get_cuda_rng_tracker()


def seed_everything(seed: int, tp_rank: int = 0, pp_rank: int = 0) -> None:
    default_seed = seed + 100 * pp_rank
    random.seed(default_seed)
    np.random.seed(default_seed % 2**32)
    torch.manual_seed(default_seed)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, seed + 2718 + tp_rank)
