"""Small hand-made model and hardware descriptions with round numbers, for planner tests."""
from __future__ import annotations

from autotune.hardware import Hardware
from model_zoo.base import LayerType, ModelSpec, OtherModules

MB = 1024 * 1024


def layer(name="enc", count=4, params=1_000_000, fwd_flops=1e12, act_mb=100.0, ckpt_mb=10.0, heads=8,
          seq=128, hidden=64, allreduce_bytes=1_000_000, boundary_bytes=1_000_000) -> LayerType:
    """A layer whose activation shrinks as 1/tp (all of it inside attention/MLP)."""
    return LayerType(name=name, count=count, seq_len=seq, hidden=hidden, heads=heads, ffn_hidden=4 * hidden,
                     params=params, fwd_flops=fwd_flops,
                     act_bytes={t: int(act_mb * MB / t) for t in (1, 2, 4, 8) if heads % t == 0},
                     ckpt_bytes=int(ckpt_mb * MB), tp_allreduce_bytes=allreduce_bytes, tp_allreduces_fwd=2,
                     boundary_bytes=boundary_bytes)


def other(params_first=0, params_last=0, flops=0.0, act=0) -> OtherModules:
    d = {t: params_first for t in (1, 2, 4, 8)}
    e = {t: params_last for t in (1, 2, 4, 8)}
    z = {t: 0 for t in (1, 2, 4, 8)}
    a = {t: act for t in (1, 2, 4, 8)}
    return OtherModules(params_first=d, params_last=e, tied_params=z, fwd_flops_first=flops, fwd_flops_last=flops,
                        act_bytes_first=a, act_bytes_last=a)


def spec(layer_types, order, oth=None, precision="bf16", name="synthetic") -> ModelSpec:
    return ModelSpec(name=name, family="synthetic", precision=precision, layer_types=tuple(layer_types),
                     layer_order=tuple(order), other=oth or other())


def hardware(gpus=1, nodes=1, mem_gb=80.0, tflops=100.0, busbw=100.0, p2p=50.0, latency_us=0.0, mfu=0.5,
             overlap=1.0, mem_bw=1000.0) -> Hardware:
    return Hardware(name="synthetic", nodes=nodes, gpus_per_node=gpus // nodes, gpu_memory_gb=mem_gb,
                    compute_tflops={"bf16": tflops, "fp16": tflops, "fp32": tflops / 4},
                    intra_node_busbw_gbps=busbw, inter_node_busbw_gbps=busbw / 10,
                    p2p_gbps={str(k): p2p for k in (2, 4, 8, 16)},
                    inter_node_p2p_gbps=p2p / 10, collective_latency_us=latency_us, overlap_coe=overlap,
                    analytic_mfu=mfu, mem_bw_gbps=mem_bw)
