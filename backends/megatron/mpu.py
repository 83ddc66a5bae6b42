"""The `mpu` object DeepSpeed asks for, answered from Megatron-core's parallel_state.

DeepSpeed uses it to size data parallelism, to pick the groups it reduces gradients over
(data-parallel) and to sum gradient norms over model-parallel ranks (TP x PP). Pipelined runs do
not use it: DeepSpeed's PipelineModule brings its own grid built on the same rank layout
(backends/deepspeed/pipeline.py).
"""
from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMPU:
    """Adapter with the method names DeepSpeed calls (Megatron-LM's old mpu API)."""

    # model parallel = tensor x pipeline
    def get_model_parallel_group(self):
        return ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=ps.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=ps.get_model_parallel_group())

    # tensor
    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    # DeepSpeed's older names for tensor slicing
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_rank = get_tensor_model_parallel_rank

    # data
    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(ps.get_data_parallel_group())

    # pipeline
    def get_pipe_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_pipe_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipe_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank

    # no sequence parallelism in this runtime: DeepSpeed probes these names
    def get_sequence_parallel_world_size(self) -> int:
        return 1

    def get_sequence_parallel_rank(self) -> int:
        return 0

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.get_data_parallel_world_size()

    def get_sequence_data_parallel_rank(self) -> int:
        return self.get_data_parallel_rank()

    def get_sequence_data_parallel_group(self):
        return self.get_data_parallel_group()


def _group_api(attr: str):
    """(group, world size, rank) getters for the RankGroups field `attr`."""
    def group(self):
        return getattr(self.rg, attr)

    def size(self) -> int:
        return dist.get_world_size(group=group(self))

    def rank(self) -> int:
        return dist.get_rank(group=group(self))

    return group, size, rank


class LayerwiseMPU(MegatronMPU):
    """The mpu for per-layer TP plans (backends/megatron/layerwise.py): DeepSpeed's data-parallel group is
    the set of ranks holding identical parameters in every layer, the model-parallel group the ranks with
    the same index in it (gradient norms are summed there), and the "tensor" group, as in DeepSpeed's
    pipeline grid, the part of that group inside the stage: ZeRO counts every gradient on its rank 0
    (which is also rank 0 of the model-parallel group and owns every shard it holds)."""

    def __init__(self, groups):
        self.rg = groups.layerwise

    get_model_parallel_group, get_model_parallel_world_size, get_model_parallel_rank = _group_api("mp_group")
    get_tensor_model_parallel_group, get_tensor_model_parallel_world_size, get_tensor_model_parallel_rank = \
        _group_api("model_group")
    get_data_parallel_group, get_data_parallel_world_size, get_data_parallel_rank = _group_api("dp_group")

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(self.rg.model_group)[0]

    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_rank = get_tensor_model_parallel_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.rg.dp_group)
