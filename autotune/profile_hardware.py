"""Hardware profiler: measures what the cost model needs about a cluster and writes a hardware JSON.

Run one process per GPU (or per CPU rank) under a launcher:

    torchrun --nproc_per_node 8 autotune/profile_hardware.py --out hardware.json
    deepspeed --num_gpus 8 autotune/profile_hardware.py --out hardware.json
    torchrun --nproc_per_node 4 autotune/profile_hardware.py --device cpu --out cpu.json   # gloo
    python autotune/profile_hardware.py --out one-gpu.json                                 # one rank

What it measures (plain torch.distributed: NCCL on GPUs, gloo on CPU; CUDA events on GPU, wall
clock on CPU; every number is a trimmed mean after warm-up):
  * all-reduce bus bandwidth per group size W, W/2, ..., 2, for consecutive and strided rank groups;
  * point-to-point bandwidth per pipeline degree (stages are contiguous rank blocks, each rank sends
    to the same position of the next stage while receiving from the previous one, as a pipeline does);
  * all-gather, reduce-scatter and all-reduce time against message size per consecutive group size,
    fitted t_ms = a + b * MB by least squares (MB = 1e6 bytes of the full, gathered tensor);
  * the compute/communication overlap slowdown (GEMM on one stream, all-reduce on another; CPU: a
    thread), the dense GEMM ceiling and the device memory bandwidth.
The output loads with `autotune.hardware.load_hardware`; `sources` says where each number came from
and `measurements` keeps the raw points (ignored by the loader).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from autotune.hardware import Hardware, HardwareError
from autotune.plan import write_json_atomic
from model_zoo.common import TORCH_DTYPES

MB = 1_000_000  # collective fits and bandwidths use decimal units: GB/s = 1e9 B/s, MB = 1e6 B


class UsageError(ValueError):
    """Bad command-line input; reported as one line with exit code 2."""


@dataclass(frozen=True)
class Settings:
    """Message sizes and repetition counts: large on GPUs, small on CPU so 4 gloo ranks finish fast."""

    allreduce_bytes: int
    p2p_bytes: int
    sweep_bytes: tuple[int, ...]
    latency_bytes: int
    warmup: int
    reps: int
    inner: int
    gemm_n: int
    gemm_reps: int
    copy_bytes: int
    overlap_target_ms: float
    overlap_reps: int
    overlap_gemm_n: int


GPU_SETTINGS = Settings(allreduce_bytes=256 * 2**20, p2p_bytes=64 * 2**20,
                        sweep_bytes=tuple(2**k * 2**20 for k in range(0, 9)), latency_bytes=4096,
                        warmup=5, reps=20, inner=5, gemm_n=8192, gemm_reps=30, copy_bytes=1024 * 2**20,
                        overlap_target_ms=150.0, overlap_reps=3, overlap_gemm_n=4096)
CPU_SETTINGS = Settings(allreduce_bytes=4 * 2**20, p2p_bytes=4 * 2**20,
                        sweep_bytes=tuple(2**k * 2**16 for k in range(0, 8)), latency_bytes=1024,
                        warmup=2, reps=8, inner=2, gemm_n=768, gemm_reps=5, copy_bytes=64 * 2**20,
                        overlap_target_ms=150.0, overlap_reps=2, overlap_gemm_n=512)
QUICK_SETTINGS = Settings(allreduce_bytes=64 * 2**10, p2p_bytes=64 * 2**10,
                          sweep_bytes=tuple(2**k * 2**12 for k in range(0, 5)), latency_bytes=256,
                          warmup=1, reps=3, inner=1, gemm_n=128, gemm_reps=2, copy_bytes=2**20,
                          overlap_target_ms=15.0, overlap_reps=1, overlap_gemm_n=128)


# ---------------------------------------------------------------------------------------- set-up
@dataclass
class Env:
    """This process's place in the launch: rank, world, node layout, device and backend."""

    rank: int
    world: int
    local_rank: int
    nodes: int
    gpus_per_node: int
    device: torch.device
    backend: str
    device_name: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="hardware JSON to write (rank 0 writes it atomically)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cuda: NCCL on GPUs; cpu: gloo on CPU ranks; auto: cuda when available")
    p.add_argument("--quick", action="store_true", help="tiny messages and few repetitions (tests, smoke runs)")
    p.add_argument("--name", default=None, help="hardware name in the file (default: derived from the devices)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="ranks per node (default: counted from host names; set it to simulate nodes)")
    p.add_argument("--allreduce-mb", type=float, default=None, help="all-reduce / p2p message size in MiB")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject bad input before any process group exists, so every rank fails the same way."""
    folder = os.path.dirname(os.path.abspath(args.out)) or "."
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes; other nodes need not have the folder
        if os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is a folder; give a file name such as {args.out}/hardware.json")
        if not os.path.isdir(folder):
            raise UsageError(f"--out folder {folder} does not exist; create it or choose another path")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no GPU; run on a GPU machine or pass --device cpu")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise UsageError(f"--gpus-per-node {args.gpus_per_node} must be >= 1")
    if args.allreduce_mb is not None and args.allreduce_mb <= 0:
        raise UsageError(f"--allreduce-mb {args.allreduce_mb} must be > 0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.gpus_per_node is not None and world % args.gpus_per_node:
        raise UsageError(f"--gpus-per-node {args.gpus_per_node} does not divide the world size {world}; "
                         f"give a divisor of {world}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(args: argparse.Namespace) -> Env:
    """Join the process group the launcher set up (or a one-rank group when run without a launcher)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
        dist.init_process_group(backend, device_id=device)
        device_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        backend = "gloo"
        dist.init_process_group(backend)
        device_name = "CPU"
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.gpus_per_node:
        gpn = args.gpus_per_node
    else:
        hosts: list = [None] * world
        dist.all_gather_object(hosts, socket.gethostname())
        gpn = world // len(set(hosts))
    if not use_cuda:
        # Gloo ranks share the CPU: give each its share of cores so compute numbers are per rank.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(gpn, world)))
    return Env(rank, world, local_rank, world // gpn, gpn, device, backend, device_name)


# ---------------------------------------------------------------------------------------- timing
def trimmed_mean(xs: list[float], cut: float = 0.2) -> float:
    """Mean after dropping the `cut` share of lowest and highest samples (robust to stragglers)."""
    xs = sorted(xs)
    k = int(len(xs) * cut)
    kept = xs[k:len(xs) - k] or xs
    return sum(kept) / len(kept)


def sync(env: Env) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def time_once_ms(env: Env, fn: Callable[[], object], inner: int) -> float:
    """Milliseconds per call of `fn`, over `inner` back-to-back calls (CUDA events on GPU)."""
    if env.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def measure_ms(env: Env, fn: Callable[[], object], s: Settings, aligned: bool = True,
               reps: int | None = None, inner: int | None = None) -> float:
    """Trimmed mean of `reps` timings after `s.warmup` untimed calls; ranks start each timing together."""
    inner = inner or s.inner
    for _ in range(s.warmup):
        fn()
    sync(env)
    samples = []
    for _ in range(reps or s.reps):
        if aligned:
            dist.barrier()
        samples.append(time_once_ms(env, fn, inner))
    return trimmed_mean(samples)


def gather_floats(env: Env, value: float) -> list[float]:
    """Every rank's `value`, on every rank."""
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    out = [torch.zeros_like(t) for _ in range(env.world)]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]


def comm_dtype(env: Env) -> torch.dtype:
    """bf16 on GPUs (what training sends); fp32 on gloo (its reductions are fp32-native)."""
    return torch.bfloat16 if env.device.type == "cuda" else torch.float32


def buffer(env: Env, nbytes: int) -> torch.Tensor:
    dt = comm_dtype(env)
    return torch.ones(max(1, nbytes // torch.empty((), dtype=dt).element_size()), dtype=dt, device=env.device)


# ---------------------------------------------------------------------------------------- groups
def group_sizes(world: int) -> list[int]:
    """W, W/2, ... while the size divides W and is >= 2 (Galvatron's sweep)."""
    out, s = [], world
    while s >= 2 and world % s == 0:
        out.append(s)
        if s % 2:
            break
        s //= 2
    return out


def partition(world: int, size: int, consecutive: bool) -> list[list[int]]:
    """Rank groups of `size`: consecutive blocks [i*s, (i+1)*s) or strided {i, i+W/s, ...}."""
    n = world // size
    if consecutive:
        return [list(range(i * size, (i + 1) * size)) for i in range(n)]
    return [list(range(i, world, n)) for i in range(n)]


def my_group(env: Env, groups: list[list[int]]):
    """Create every group (a collective call on all ranks) and return (this rank's group, its members)."""
    mine = None
    for ranks in groups:
        g = dist.new_group(ranks)
        if env.rank in ranks:
            mine = (g, ranks)
    assert mine is not None
    return mine


class Progress:
    """A tqdm bar on rank 0; silent elsewhere."""

    def __init__(self, env: Env, total: int):
        self.bar = None
        if env.rank == 0:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="profile_hardware", unit="step", file=sys.stderr)

    def step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------- measurements
def measure_allreduce(env: Env, s: Settings, nbytes: int, prog: Progress) -> dict:
    """Bus bandwidth of all-reduce per (group size, consecutive) over all groups measured at once."""
    x = buffer(env, nbytes)
    real_bytes = x.numel() * x.element_size()
    out = {}
    for size in group_sizes(env.world):
        for consec in ((True,) if size == env.world else (True, False)):
            groups = partition(env.world, size, consec)
            g, _ = my_group(env, groups)
            ms = gather_floats(env, measure_ms(env, lambda: dist.all_reduce(x, group=g), s))
            per_group = [max(ms[r] for r in ranks) for ranks in groups]  # a group finishes with its slowest rank
            bws = [2 * (size - 1) / size * real_bytes / (t * 1e-3) / 1e9 for t in per_group]
            out[f"{size}_{int(consec)}"] = {"bytes": real_bytes, "ms_per_group": per_group, "busbw_gbps": bws,
                                            "mean_busbw_gbps": sum(bws) / len(bws), "groups": groups}
            prog.step(f"all-reduce {size}{'' if consec else ' strided'}")
    return out


def measure_p2p(env: Env, s: Settings, nbytes: int, prog: Progress) -> dict:
    """Per pipeline degree: every rank sends to its peer in the next stage and receives from the previous."""
    send, recv = buffer(env, nbytes), buffer(env, nbytes)
    real_bytes = send.numel() * send.element_size()
    out = {}
    for pp in [p for p in group_sizes(env.world)][::-1]:
        block = env.world // pp
        nxt, prv = env.rank + block, env.rank - block

        def exchange() -> None:
            ops = []
            if nxt < env.world:
                ops.append(dist.P2POp(dist.isend, send, nxt))
            if prv >= 0:
                ops.append(dist.P2POp(dist.irecv, recv, prv))
            for w in dist.batch_isend_irecv(ops):
                w.wait()

        ms = gather_floats(env, measure_ms(env, exchange, s))
        links = []
        for r in range(env.world - block):
            t = max(ms[r], ms[r + block])
            links.append({"src": r, "dst": r + block, "ms": t, "gbps": real_bytes / (t * 1e-3) / 1e9,
                          "crosses_node": r // env.gpus_per_node != (r + block) // env.gpus_per_node})
        out[str(pp)] = {"bytes": real_bytes, "links": links}
        prog.step(f"p2p pp={pp}")
    return out


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float, float]:
    """Least squares t = a + b*x in *relative* error (weights 1/t^2, so small messages count as much as
    large ones), with a, b >= 0; returns (a, b, median relative error, max relative error)."""
    w = [1.0 / (y * y) if y > 0 else 0.0 for y in ys]
    sw, swx, swy = sum(w), sum(wi * x for wi, x in zip(w, xs)), sum(wi * y for wi, y in zip(w, ys))
    swxx = sum(wi * x * x for wi, x in zip(w, xs))
    swxy = sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    det = sw * swxx - swx * swx
    b = (sw * swxy - swx * swy) / det if det > 0 else 0.0
    a = (swy - b * swx) / sw
    if b < 0:  # noise-dominated sweep: a constant is the honest fit
        a, b = swy / sw, 0.0
    elif a < 0:  # a negative fixed cost is unphysical: fit through the origin instead
        a, b = 0.0, swxy / swxx
    errs = [abs(a + b * x - y) / y for x, y in zip(xs, ys) if y > 0]
    return a, b, statistics.median(errs), max(errs)


def measure_sweeps(env: Env, s: Settings, prog: Progress) -> dict:
    """All-gather, reduce-scatter and all-reduce time against full-tensor size, per consecutive group size."""
    out: dict = {"allgather": {}, "reducescatter": {}, "allreduce": {}}
    for size in group_sizes(env.world):
        g, _ = my_group(env, partition(env.world, size, True))
        for op in out:
            points = []
            for nbytes in s.sweep_bytes:
                full = buffer(env, nbytes)
                full = full[: max(1, full.numel() // size) * size].contiguous()
                shard = full[: full.numel() // size].clone()
                if op == "allgather":
                    fn = lambda: dist.all_gather_into_tensor(full, shard, group=g)  # noqa: E731
                elif op == "reducescatter":
                    fn = lambda: dist.reduce_scatter_tensor(shard, full, group=g)  # noqa: E731
                else:
                    fn = lambda: dist.all_reduce(full, group=g)  # noqa: E731
                ms = max(gather_floats(env, measure_ms(env, fn, s)))
                points.append((full.numel() * full.element_size() / MB, ms))
            a, b, med, mx = fit_line([p[0] for p in points], [p[1] for p in points])
            out[op][str(size)] = {"points_mb_ms": points, "a_ms": a, "b_ms_per_mb": b,
                                  "median_rel_err": med, "max_rel_err": mx}
            prog.step(f"{op} sweep {size}")
    return out


def measure_latency(env: Env, s: Settings) -> float:
    """Microseconds of a tiny all-reduce over the whole world: the fixed cost of one collective."""
    x = buffer(env, s.latency_bytes)
    ms = gather_floats(env, measure_ms(env, lambda: dist.all_reduce(x), s, inner=max(s.inner, 10)))
    return max(ms) * 1e3


def gemm_tflops(env: Env, dtype: torch.dtype, s: Settings) -> float:
    """Dense n x n x n matmul rate in TFLOP/s (fp32 as PyTorch runs it by default: no TF32 on GPU)."""
    n = s.gemm_n
    a = torch.randn(n, n, dtype=dtype, device=env.device)
    b = torch.randn(n, n, dtype=dtype, device=env.device)
    c = torch.empty(n, n, dtype=dtype, device=env.device)
    ms = measure_ms(env, lambda: torch.matmul(a, b, out=c), s, aligned=False, reps=s.gemm_reps, inner=1)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def copy_gbps(env: Env, s: Settings) -> float:
    """Device memory bandwidth: a large tensor copy counts its bytes read plus written."""
    src = torch.ones(s.copy_bytes // 4, dtype=torch.float32, device=env.device)
    dst = torch.empty_like(src)
    ms = measure_ms(env, lambda: dst.copy_(src), s, aligned=False, reps=max(3, s.gemm_reps // 2), inner=2)
    return 2 * s.copy_bytes / (ms * 1e-3) / 1e9


def measure_overlap(env: Env, s: Settings) -> dict:
    """Slowdown of a GEMM loop and an all-reduce loop when they run at the same time (each sized to
    take about the same time alone). GPU: two CUDA streams; CPU: the all-reduce in a thread."""
    cuda = env.device.type == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    n = s.overlap_gemm_n
    a = torch.randn(n, n, dtype=dt, device=env.device)
    c = torch.empty_like(a)
    x = buffer(env, s.allreduce_bytes)
    comp1 = measure_ms(env, lambda: torch.matmul(a, a, out=c), s, aligned=False, reps=3, inner=2)
    comm1 = max(gather_floats(env, measure_ms(env, lambda: dist.all_reduce(x), s, reps=3, inner=2)))
    n_comp = max(1, int(s.overlap_target_ms / comp1))
    n_comm = max(1, int(s.overlap_target_ms / comm1))
    n_comm = int(max(gather_floats(env, n_comm)))  # every rank must issue the same number of collectives
    comp_loop = lambda: [torch.matmul(a, a, out=c) for _ in range(n_comp)]  # noqa: E731
    comm_loop = lambda: [dist.all_reduce(x) for _ in range(n_comm)]  # noqa: E731
    comp_alone = measure_ms(env, comp_loop, s, reps=s.overlap_reps, inner=1)
    comm_alone = measure_ms(env, comm_loop, s, reps=s.overlap_reps, inner=1)
    together = [run_together(env, comp_loop, comm_loop) for _ in range(s.overlap_reps)]
    comp_tog = statistics.median(t[0] for t in together)
    comm_tog = statistics.median(t[1] for t in together)
    slow = [max(gather_floats(env, comp_tog / comp_alone)), max(gather_floats(env, comm_tog / comm_alone))]
    return {"compute_alone_ms": comp_alone, "comm_alone_ms": comm_alone, "compute_together_ms": comp_tog,
            "comm_together_ms": comm_tog, "compute_slowdown": slow[0], "comm_slowdown": slow[1],
            "overlap_coe": max(1.0, *slow), "gemm_n": n, "allreduce_bytes": x.numel() * x.element_size(),
            "method": "two CUDA streams" if cuda else "all-reduce in a Python thread (gloo releases the GIL)"}


def run_together(env: Env, comp: Callable[[], object], comm: Callable[[], object]) -> tuple[float, float]:
    """(compute ms, communication ms) when both loops run concurrently."""
    dist.barrier()
    sync(env)
    if env.device.type == "cuda":
        side = torch.cuda.Stream(env.device)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ev[2].record(side)
            comm()
            ev[3].record(side)
        ev[0].record()
        comp()
        ev[1].record()
        torch.cuda.synchronize(env.device)
        return ev[0].elapsed_time(ev[1]), ev[2].elapsed_time(ev[3])
    result = {}

    def comm_thread() -> None:
        t0 = time.perf_counter()
        comm()
        result["comm"] = (time.perf_counter() - t0) * 1e3

    th = threading.Thread(target=comm_thread)
    th.start()
    t0 = time.perf_counter()
    comp()
    comp_ms = (time.perf_counter() - t0) * 1e3
    th.join()
    return comp_ms, result["comm"]


# ---------------------------------------------------------------------------------------- assembly
def device_memory_gb(env: Env) -> float:
    """GiB per device: the GPU's total memory, or this rank's share of host memory on CPU."""
    if env.device.type == "cuda":
        return round(torch.cuda.get_device_properties(env.device).total_memory / 2**30, 1)
    import psutil
    return round(psutil.virtual_memory().total / 2**30 / min(env.gpus_per_node, env.world), 1)


def default_name(env: Env) -> str:
    short = env.device_name.replace("NVIDIA ", "").replace(" ", "-")
    if env.device.type == "cpu":
        short = "CPU-gloo"
    return f"{env.world}x{short}" if env.nodes == 1 else f"{env.nodes}x{env.gpus_per_node}x{short}"


def build_hardware(env: Env, args: argparse.Namespace, m: dict) -> dict:
    """Turn the raw measurements into the hardware JSON (plus `measurements`), with a source per number."""
    when = _dt.date.today().isoformat()
    cmd = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    by = f"measured by autotune/profile_hardware.py on {when} ({env.backend}, {env.world} ranks, `{cmd}`)"
    dflt = Hardware(name="", nodes=1, gpus_per_node=1, gpu_memory_gb=1, compute_tflops={})
    src: dict[str, str] = {}
    hw: dict = {"name": args.name or default_name(env), "nodes": env.nodes, "gpus_per_node": env.gpus_per_node,
                "gpu_memory_gb": device_memory_gb(env), "compute_tflops": m["gemm_tflops"]}
    src["gpu_memory_gb"] = ("torch.cuda.get_device_properties total_memory in GiB; " if env.device.type == "cuda"
                            else "host memory / ranks per node in GiB; ") + by
    src["compute_tflops"] = f"median over ranks of an {m['gemm_n']}^3 matmul per precision; {by}"
    src["mem_bw_gbps"] = f"device copy of {m['copy_bytes'] // 2**20} MiB, bytes read + written; {by}"
    hw["mem_bw_gbps"] = m["mem_bw_gbps"]

    ar = m["allreduce"]
    hw["allreduce_busbw_gbps"] = {k: round(v["mean_busbw_gbps"], 3) for k, v in ar.items()}
    if str(env.world) + "_1" in ar:  # for the whole world strided and consecutive are the same group
        hw["allreduce_busbw_gbps"][f"{env.world}_0"] = hw["allreduce_busbw_gbps"][f"{env.world}_1"]
    src["allreduce_busbw_gbps"] = (f"all-reduce of {m['allreduce_bytes'] / 2**20:g} MiB per group, mean bus "
                                   f"bandwidth over the groups measured at once; {by}" if ar
                                   else "not measured: one rank")
    intra = [v["mean_busbw_gbps"] for k, v in ar.items() if _fits_node(env, k)]
    inter = [v["mean_busbw_gbps"] for k, v in ar.items() if not _fits_node(env, k)]
    hw["intra_node_busbw_gbps"] = round(intra[0], 3) if intra else dflt.intra_node_busbw_gbps
    src["intra_node_busbw_gbps"] = (f"largest measured group inside one node; {by}" if intra else
                                    "not measured (no multi-rank group inside a node): dataclass default")
    hw["inter_node_busbw_gbps"] = round(min(inter), 3) if inter else dflt.inter_node_busbw_gbps
    src["inter_node_busbw_gbps"] = (f"slowest measured group spanning nodes; {by}" if inter else
                                    "not measured (one node): dataclass default")

    p2p, inter_links = {}, []
    for pp, v in m["p2p"].items():
        inside = [lk["gbps"] for lk in v["links"] if not lk["crosses_node"]]
        across = [lk["gbps"] for lk in v["links"] if lk["crosses_node"]]
        inter_links += across
        p2p[pp] = round(statistics.mean(inside or across), 3)
    hw["p2p_gbps"] = p2p
    src["p2p_gbps"] = (f"{m['p2p_bytes'] / 2**20:g} MiB batched isend/irecv between adjacent contiguous stage "
                       f"blocks, mean over links inside a node (links across nodes where none); {by}" if p2p
                       else "not measured: one rank")
    hw["inter_node_p2p_gbps"] = round(min(inter_links), 3) if inter_links else dflt.inter_node_p2p_gbps
    src["inter_node_p2p_gbps"] = (f"slowest stage link that crosses nodes; {by}" if inter_links else
                                  "not measured (one node): dataclass default")

    if m.get("latency_us") is not None:
        hw["collective_latency_us"] = round(m["latency_us"], 2)
        src["collective_latency_us"] = f"all-reduce of {m['latency_bytes']} B over all ranks; {by}"
    else:
        hw["collective_latency_us"] = dflt.collective_latency_us
        src["collective_latency_us"] = "not measured: one rank; dataclass default"
    ov = m.get("overlap")
    hw["overlap_coe"] = round(ov["overlap_coe"], 4) if ov else 1.0
    src["overlap_coe"] = (f"max(compute slowdown {ov['compute_slowdown']:.3f}, communication slowdown "
                          f"{ov['comm_slowdown']:.3f}) with a {ov['gemm_n']}^3 GEMM loop and an all-reduce loop "
                          f"run together ({ov['method']}); {by}" if ov
                          else "one rank: no communication to overlap, so 1.0 (not measured)")

    fits, errs = {}, []
    for op, per_size in m["sweeps"].items():
        fits[op] = {sz: [round(v["a_ms"], 6), round(v["b_ms_per_mb"], 6)] for sz, v in per_size.items()}
        errs += [v["median_rel_err"] for v in per_size.values()]
    hw["collective_fits"] = fits
    src["collective_fits"] = (f"t_ms = a + b * MB (MB = 1e6 bytes of the full gathered / pre-scatter tensor), "
                              f"least squares in relative error over {len(m['sweep_bytes'])} sizes "
                              f"{m['sweep_bytes'][0]}..{m['sweep_bytes'][-1]} B, consecutive groups; median "
                              f"relative error over fits {statistics.median(errs):.3%}, worst point "
                              f"{max(v['max_rel_err'] for p in m['sweeps'].values() for v in p.values()):.3%}; {by}"
                              if errs else "not measured: one rank")
    hw["sources"] = src
    hw["measurements"] = {k: v for k, v in m.items()}
    Hardware.from_dict(hw, origin="profiled hardware")  # refuse to write what the loader would reject
    return hw


def _fits_node(env: Env, key: str) -> bool:
    size, consec = (int(x) for x in key.split("_"))
    stride = 1 if consec else env.world // size
    return (size - 1) * stride < env.gpus_per_node


def profile(env: Env, args: argparse.Namespace) -> dict:
    """Run every measurement; returns the raw measurement dict (same on all ranks)."""
    s = QUICK_SETTINGS if args.quick else (GPU_SETTINGS if env.device.type == "cuda" else CPU_SETTINGS)
    ar_bytes = int(args.allreduce_mb * 2**20) if args.allreduce_mb else s.allreduce_bytes
    # --allreduce-mb sets the p2p message too (as its help says); otherwise the settings' own size
    p2p_bytes = ar_bytes if args.allreduce_mb else min(s.p2p_bytes, ar_bytes)
    sizes = group_sizes(env.world)
    n_ar = sum(1 if sz == env.world else 2 for sz in sizes)
    total = 2 + (n_ar + len(sizes) + 3 * len(sizes) + 2 if env.world > 1 else 0)
    prog = Progress(env, total)
    m: dict = {"sweep_bytes": list(s.sweep_bytes), "allreduce_bytes": ar_bytes, "p2p_bytes": p2p_bytes,
               "latency_bytes": s.latency_bytes, "gemm_n": s.gemm_n, "copy_bytes": s.copy_bytes,
               "device_name": env.device_name, "backend": env.backend, "world": env.world}
    precisions = {k: TORCH_DTYPES[k] for k in (("fp32",) if env.device.type == "cpu" else ("bf16", "fp16", "fp32"))}
    m["gemm_tflops"] = {k: round(statistics.median(gather_floats(env, gemm_tflops(env, dt, s))), 2)
                        for k, dt in precisions.items()}
    prog.step("GEMM")
    m["mem_bw_gbps"] = round(statistics.median(gather_floats(env, copy_gbps(env, s))), 1)
    prog.step("memory copy")
    m["allreduce"], m["p2p"], m["sweeps"], m["overlap"], m["latency_us"] = {}, {}, {}, None, None
    if env.world > 1:
        m["allreduce"] = measure_allreduce(env, s, ar_bytes, prog)
        m["p2p"] = measure_p2p(env, s, p2p_bytes, prog)
        m["sweeps"] = measure_sweeps(env, s, prog)
        m["latency_us"] = measure_latency(env, s)
        prog.step("latency")
        m["overlap"] = measure_overlap(env, s)
        prog.step("overlap")
    prog.close()
    return m


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"profile_hardware: error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    env = init_distributed(args)
    try:
        m = profile(env, args)
        if env.rank == 0:
            hw = build_hardware(env, args, m)
            hw["measurements"]["profile_seconds"] = round(time.time() - t0, 1)
            write_json_atomic(args.out, hw)
            print(f"wrote {args.out}: {hw['name']}, GEMM {hw['compute_tflops']} TFLOP/s, all-reduce "
                  f"{hw['allreduce_busbw_gbps']} GB/s, p2p {hw['p2p_gbps']} GB/s, overlap {hw['overlap_coe']}, "
                  f"{time.time() - t0:.1f} s")
        dist.barrier()
    except HardwareError as e:
        print(f"profile_hardware: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
