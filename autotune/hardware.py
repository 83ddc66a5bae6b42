"""Hardware description: the cluster the planner plans for.

JSON format (written by autotune/profile_hardware.py, read by the search):

    {
      "name": "8xH100", "nodes": 1, "gpus_per_node": 8, "gpu_memory_gb": 80,
      "compute_tflops": {"bf16": 734.5, "fp16": 734.5, "fp32": 51.0},   # dense GEMM ceiling per GPU
      "allreduce_busbw_gbps": {"8_1": 360.0, "4_1": 340.0, "4_0": 340.0, "2_1": 300.0, "2_0": 300.0},
                                                      # "{group size}_{1 consecutive | 0 strided}" -> GB/s
      "intra_node_busbw_gbps": 360.0,                 # fallback for groups inside one node
      "inter_node_busbw_gbps": 45.0,                  # fallback for groups that span nodes (per GPU)
      "p2p_gbps": {"2": 300.0, "4": 300.0, "8": 300.0},  # pipeline degree -> GB/s between stages
      "inter_node_p2p_gbps": 45.0,
      "collective_latency_us": 15.0,                  # fixed cost of one collective call
      "overlap_coe": 1.15,                            # slowdown when compute and communication overlap
      "model_profiles": {"bf16": "profiles/h100"},    # presets: shipped model profiles of this GPU
      "sources": {"compute_tflops": "...", ...}       # where every number comes from
    }

Bandwidths are *bus* bandwidths in GB/s (1e9 B/s), as nccl-tests reports them: a ring all-reduce of
M bytes over n ranks moves 2(n-1)/n * M bytes per rank, an all-gather or reduce-scatter (n-1)/n * M.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
PRESET_DIR = os.path.join(HERE, "hardware_presets")


class HardwareError(ValueError):
    """A hardware file or preset that cannot be used."""


@dataclass
class Hardware:
    name: str
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    compute_tflops: dict[str, float]
    allreduce_busbw_gbps: dict[str, float] = field(default_factory=dict)
    intra_node_busbw_gbps: float = 100.0
    inter_node_busbw_gbps: float = 10.0
    p2p_gbps: dict[str, float] = field(default_factory=dict)
    inter_node_p2p_gbps: float = 10.0
    collective_latency_us: float = 20.0
    overlap_coe: float = 1.2
    mem_bw_gbps: float = 2000.0    # device memory bandwidth (GB/s): bounds the optimizer step
    # Achieved share of the GEMM ceiling for Transformer layers when no model profile exists;
    # a model profile (measured layer times) replaces it.
    analytic_mfu: float = 0.55
    sources: dict[str, str] = field(default_factory=dict)
    # Fitted collective times from the profiler: {"allgather": {"8": [a_ms, b_ms_per_MB]}, ...}
    collective_fits: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # Model profiles measured on this hardware's GPU and shipped with the repository: precision -> folder of
    # <model preset>.json, relative to the repository root; the search uses them unless told otherwise
    model_profiles: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    # ------------------------------------------------------------ bandwidth look-ups
    def group_spans_nodes(self, size: int, stride: int) -> bool:
        """A group of `size` ranks `stride` apart (rank blocks are node-major) crosses a node boundary."""
        return size > 1 and (size - 1) * stride >= self.gpus_per_node

    def allreduce_busbw(self, size: int, consecutive: bool, stride: int = 1) -> float:
        """Bus bandwidth (GB/s) of an all-reduce over `size` ranks `stride` apart."""
        if size <= 1:
            return float("inf")
        spans = self.group_spans_nodes(size, stride)
        key = f"{size}_{1 if consecutive else 0}"
        if key in self.allreduce_busbw_gbps:
            # The profiler measures consecutive groups at stride 1 and strided ones at stride W/size;
            # the number applies to our group when both cross (or both stay inside) a node.
            measured_stride = 1 if consecutive else self.world_size // size
            if self.group_spans_nodes(size, measured_stride) == spans:
                return self.allreduce_busbw_gbps[key]
        return self.inter_node_busbw_gbps if spans else self.intra_node_busbw_gbps

    def p2p_bw(self, pp: int, crosses_node: bool) -> float:
        """Point-to-point bandwidth (GB/s) between adjacent pipeline stages."""
        if crosses_node:
            return self.inter_node_p2p_gbps
        return self.p2p_gbps.get(str(pp), self.intra_node_busbw_gbps)

    def compute_ceiling(self, precision: str) -> float:
        """Dense GEMM ceiling in FLOP/s."""
        # A CPU profile measures fp32 only: other precisions fall back to the fp32 (else any) ceiling.
        for key in (precision, "fp32", "bf16"):
            if key in self.compute_tflops:
                return self.compute_tflops[key] * 1e12
        return next(iter(self.compute_tflops.values())) * 1e12

    # ------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, origin: str = "hardware file") -> "Hardware":
        required = ("name", "nodes", "gpus_per_node", "gpu_memory_gb", "compute_tflops")
        missing = [k for k in required if k not in d]
        if missing:
            raise HardwareError(f"{origin} lacks key(s) {', '.join(missing)}; regenerate it with "
                                f"autotune/profile_hardware.py or start from a preset in {PRESET_DIR}")
        known = set(cls.__dataclass_fields__)
        hw = cls(**{k: v for k, v in d.items() if k in known})
        if hw.nodes < 1 or hw.gpus_per_node < 1 or hw.gpu_memory_gb <= 0:
            raise HardwareError(f"{origin}: nodes, gpus_per_node and gpu_memory_gb must be positive")
        return hw

    def with_layout(self, gpus: int, nodes: int | None = None, gpu_memory_gb: float | None = None) -> "Hardware":
        """The same hardware, re-shaped to `gpus` GPUs on `nodes` nodes (per-GPU numbers kept)."""
        if nodes is None:
            if gpus > self.gpus_per_node and gpus % self.gpus_per_node:
                raise HardwareError(f"--gpus {gpus} does not fill whole {self.gpus_per_node}-GPU nodes of "
                                    f"'{self.name}'; give a multiple of {self.gpus_per_node} or --nodes")
            nodes = max(1, gpus // self.gpus_per_node)
        if nodes < 1 or gpus < 1 or gpus % nodes:
            raise HardwareError(f"--gpus {gpus} is not divisible by --nodes {nodes}; give a multiple of {nodes}")
        d = self.to_dict()
        d.update(nodes=nodes, gpus_per_node=gpus // nodes)
        if gpu_memory_gb is not None:
            d["gpu_memory_gb"] = gpu_memory_gb
        if (nodes, gpus // nodes) != (self.nodes, self.gpus_per_node):
            # Measured group bandwidths belong to the measured layout; a new layout uses the fallbacks.
            d["allreduce_busbw_gbps"] = {k: v for k, v in d["allreduce_busbw_gbps"].items()
                                         if int(k.split("_")[0]) <= min(gpus // nodes, self.gpus_per_node)
                                         and k.endswith("_1")}
        return Hardware.from_dict(d)


def preset_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


def load_hardware(name_or_path: str) -> Hardware:
    """A preset name (see autotune/hardware_presets/) or a path to a hardware JSON file."""
    if os.path.isfile(name_or_path):
        path = name_or_path
    else:
        path = os.path.join(PRESET_DIR, f"{name_or_path}.json")
        if not os.path.isfile(path):
            raise HardwareError(f"unknown hardware '{name_or_path}': use a preset ({', '.join(preset_names())}) "
                                f"or a JSON file from autotune/profile_hardware.py")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise HardwareError(f"hardware file {path} is not valid JSON ({e.msg}, line {e.lineno}); regenerate it") from None
    return Hardware.from_dict(d, origin=f"hardware file {path}")
