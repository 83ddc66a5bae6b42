"""Time and memory of one training step under a strategy, for the DeepSpeed + Megatron-core backend.

Units: seconds and bytes inside; the plan file reports MB (MiB). Each modelling assumption is stated
in one line where it is made. The search (autotune/search.py) calls `layer_cost` per layer and
strategy, `other_cost` per stage end, and `pipeline_time` for the whole step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from autotune.hardware import Hardware
from backends.deepspeed.config import ALLGATHER_BUCKET_ELEMS, REDUCE_BUCKET_ELEMS, STAGE3_PREFETCH_ELEMS
from model_zoo.base import LayerType, ModelSpec, PRECISION_BYTES

MB = 1024 * 1024
# CUDA context + NCCL communicators + cuBLAS workspaces live outside the caching allocator.
FRAMEWORK_OVERHEAD_BYTES = 1024 * MB
# Share of the budget kept free for allocator fragmentation (reserved > allocated).
FRAGMENTATION_RESERVE = 0.08
# Adam step: reads fp32 master, m, v, fp32 grad and writes master, m, v, low-precision param (bytes/param).
OPTIMIZER_BYTES_PER_PARAM = 4 * 7 + 2
# Share of ZeRO-3's per-micro-batch engine work done by forward hooks (repeated by recompute).
ZERO3_FORWARD_HOOK_SHARE = 0.5
# Host ms per graphed layer and pass (plan.cuda_graphs): the graph replay behind its autograd Function and the
# gradient-copy hooks, in place of the layer's kernel launches. scripts/cuda_graph_probe.py on one H200
# (profiles/h200/runs/s19/): graphed fwd + bwd host time less the embeddings'/head's launch floors, 0.55-0.62
# ms per layer (ViT-L b16 and b64, BERT-L b8; 16 parameter tensors each), split 1:2 as the eager floors are.
GRAPHED_LAYER_HOST_MS = {"fwd": 0.19, "bwd": 0.39}


@dataclass(frozen=True)
class Setting:
    """Choices shared by every layer: what the outer loops of the search enumerate."""

    world: int
    pp: int
    zero: int
    chunks: int
    global_bsz: int
    precision: str = "bf16"
    vtp: int = 1
    # Ranks ZeRO shards over when that is fewer than a layer's DP degree; 0: the layer's DP. Per-layer TP
    # plans: DeepSpeed's one data-parallel group holds identical parameters in every layer, B / max TP
    # ranks of a stage (one with consecutive and strided layouts mixed; backends/megatron/layerwise.py).
    zero_dp: int = 0
    # plan.cuda_graphs: plain TP-1 layers replay CUDA graphs of their eager kernels (CostModel.layer_cost)
    cuda_graphs: bool = False

    def dp(self, tp: int) -> int:
        return self.world // self.pp // tp

    def zero_divisor(self, tp: int) -> int:
        return min(self.dp(tp), self.zero_dp) if self.zero_dp else self.dp(tp)

    def micro_batch(self, tp: int) -> float:
        """Samples one rank processes per micro-batch: the global batch split over chunks and DP replicas."""
        return self.global_bsz / self.chunks / self.dp(tp)

    def inflight(self, stage: int) -> int:
        """Micro-batches whose activations one stage holds at once under 1F1B (DeepSpeed TrainSchedule)."""
        return 1 if self.pp == 1 else min(self.pp - stage, self.chunks)


@dataclass(frozen=True)
class LayerStrategy:
    tp: int = 1
    tp_consecutive: bool = True
    checkpoint: bool = False

    def label(self, setting: Setting) -> str:
        star = "*" if self.tp_consecutive and self.tp > 1 else ""
        return (f"{setting.pp}-{self.tp}{star}-{setting.dp(self.tp)}{'f' if setting.zero == 3 else ''}"
                f"{'-c' if self.checkpoint else ''}")


@dataclass
class Cost:
    """Time (s) and memory (bytes) of a piece of the model on one rank."""

    compute_s: float = 0.0        # per step, all micro-batches: fwd + bwd + recompute, each phase of each layer
                                  # at the larger of its host and GPU time (what the per-layer search ranks)
    host_s: float = 0.0           # the same work's host side (kernel launches, engine hooks) and its GPU side;
    gpu_s: float = 0.0            # summed apart, a step that never waits for the GPU takes the larger sum
    host_fwd_s: float = 0.0       # the forwards' share of host_s and gpu_s (the rest is backward, recompute
    gpu_fwd_s: float = 0.0        # and the engine's hooks): what ordered_overlap runs in the step's order
    tp_comm_s: float = 0.0        # per step: TP all-reduces (synchronous, on the critical path)
    dp_exposed_s: float = 0.0     # per step: DP/ZeRO communication not hidden behind compute
    dp_tail_s: float = 0.0        # per step: gradient sync after the last micro-batch (ZeRO 0/1)
    optimizer_s: float = 0.0      # per step: the optimizer update of this piece's parameters as a GPU-bound step
                                  # exposes it (its host work queued during the backward)
    optimizer_host_s: float = 0.0  # the same update with its host work in series (a step whose host is not
                                   # ahead of the GPU when the backward ends); 0: optimizer_s in either case
    states_bytes: float = 0.0     # held through the activation phase: parameters, master weights, optimizer
                                  # states, persistent gradient buffers (+ accumulated gradients when chunks > 1)
    act_bytes: float = 0.0        # activations held for backward (all in-flight micro-batches)
    transient_bytes: float = 0.0  # workspace of the layer being recomputed / differentiated
    accum_bytes: float = 0.0      # with one micro-batch: gradients accumulated for the step, allocated in
                                  # this piece's backward (with several they are in states_bytes)
    regrad_bytes: float = 0.0     # a second gradient buffer that each later micro-batch's backward allocates
                                  # and frees (fp32 ZeRO-2 with accumulation); never live at the optimizer step
    step_bytes: float = 0.0       # optimizer-step workspace above states + gradients (casts, flat copies);
                                  # live when the activations are not
    lazy_bytes: float = 0.0       # the part of states_bytes the optimizer makes at its first step (Adam's moments
                                  # under DeepSpeed's ZeRO-1/2 optimizers): absent from a graphed run's first step
    graph_static_bytes: float = 0.0     # plan.cuda_graphs: the backward graph's static gradient buffers, and the
    graph_act_bytes: float = 0.0        # activations and backward workspace the capture allocates (one micro-batch
    graph_transient_bytes: float = 0.0  # through the layers alone); see search.stage_memory
    detail: dict = field(default_factory=dict)
    # a stage's compute with its pieces run in the step's order (ordered_overlap: the GPU's end, the host's end);
    # None: the sums' overlap (max of host and GPU sums), as for one piece
    ordered: tuple[float, float] | None = None

    @property
    def time_s(self) -> float:
        return self.compute_s + self.tp_comm_s + self.dp_exposed_s + self.dp_tail_s + self.optimizer_tail_s

    @property
    def optimizer_tail_s(self) -> float:
        """The optimizer step after the last backward: as a GPU-bound step exposes it (its host work queued while
        the GPU still runs the backward), unless the host is not far enough ahead to hide that: the serial step
        less the host's lead, the GPU sum over the host sum (none on a launch-bound step)."""
        if self.ordered is not None:
            lead = max(0.0, self.ordered[0] - self.ordered[1])
        else:
            lead = max(0.0, self.gpu_s - self.host_s) if self.host_s else 0.0
        return max(self.optimizer_s, self.optimizer_host_s - lead)

    @staticmethod
    def time_of(c: "Cost") -> float:
        return c.time_s

    @property
    def overlapped_compute_s(self) -> float:
        """compute_s with the host running ahead of the GPU: max(host sum, GPU sum) <= compute_s. Nothing in
        train.py's forward and backward waits for the GPU (the masks' answers come from the host), so the
        host launches later layers while the GPU runs earlier ones, and a launch-bound phase of one layer
        (a small kernel burst) hides behind a GPU-bound phase of another, but only a later one: GPU time lost
        waiting for the host is not made up (ordered_overlap, where a stage set it). Without the split: compute_s."""
        if self.ordered is not None:
            return self.ordered[0]
        return max(self.host_s, self.gpu_s) if self.host_s or self.gpu_s else self.compute_s

    @property
    def bound(self) -> str:
        """What sets this piece's compute time: 'host' (kernel launches, engine hooks: the step then follows
        the CPU's speed) when its host sum exceeds its GPU sum, 'GPU' when not, '?' without both sums."""
        if not self.host_s or not self.gpu_s:
            return "?"
        return "host" if self.host_s > self.gpu_s else "GPU"

    def time_breakdown(self, digits: int | None = None) -> dict:
        """Seconds per step by part, as the step time adds them (compute overlapped; its host and GPU sums)."""
        d = {"compute": self.overlapped_compute_s, "compute_host": self.host_s, "compute_gpu": self.gpu_s,
             "tp_comm": self.tp_comm_s, "dp_exposed": self.dp_exposed_s, "dp_tail": self.dp_tail_s,
             "optimizer": self.optimizer_tail_s}
        return {k: round(v, digits) for k, v in d.items()} if digits is not None else d

    @property
    def microbatch_s(self) -> float:
        """Per-micro-batch share of the pipelined work (what 1F1B repeats)."""
        return self.overlapped_compute_s + self.tp_comm_s + self.dp_exposed_s


def overlap(comm: float, compute: float, coe: float) -> float:
    """Time of `comm` overlapped with `compute` when both slow each other by `coe` (Galvatron's closed form)."""
    return max(comm, compute) + (coe - 1.0) * min(comm, compute)


ORDERED_MICROBATCHES = 3    # micro-batches ordered_overlap runs before it repeats the last one's increment


def ordered_overlap(pieces: list[Cost], m: int) -> tuple[float, float] | None:
    """(when the GPU ends, when the host ends) of one step's m micro-batches over `pieces` (a stage's layers with
    its embeddings and head, in forward order): each micro-batch runs every piece's forward in order, then every
    backward in reverse. The host queues a piece's kernels in its host time, one after the other; the GPU runs them
    once queued and once it is done with the earlier ones, so a piece ends on the GPU at the later of (the later of
    the GPU's freeing and the host's start on it) + its GPU time, and the host's end of queueing it. Unlike
    max(host sum, GPU sum), time the GPU waits for a host-bound piece (eager checkpointed layers, engine hooks) is
    not made up by a GPU-bound piece after it. The micro-batches repeat: the last simulated one's increment stands
    for the rest. With pp > 1 a stage interleaves micro-batches (1F1B); pipeline_time takes this per-step time per
    micro-batch all the same. None without a host/GPU split."""
    if m < 1 or not pieces or not all(p.host_s or p.gpu_s for p in pieces):
        return None
    fwd = [(p.host_fwd_s / m, p.gpu_fwd_s / m) for p in pieces]
    bwd = [((p.host_s - p.host_fwd_s) / m, (p.gpu_s - p.gpu_fwd_s) / m) for p in reversed(pieces)]
    host = gpu = 0.0
    ends = []
    for _ in range(min(m, ORDERED_MICROBATCHES)):
        for h, g in fwd + bwd:
            start, host = host, host + h
            gpu = max(max(gpu, start) + g, host)
        ends.append((gpu, host))
    if m > len(ends):
        (g1, h1), (g0, h0) = ends[-1], ends[-2] if len(ends) > 1 else (0.0, 0.0)
        rest = m - len(ends)
        return g1 + rest * (g1 - g0), h1 + rest * (h1 - h0)
    return ends[-1]


@dataclass(frozen=True)
class Calibration:
    """Correction factors fitted from short real runs (autotune/calibrate.py); identity by default."""

    compute_scale: float = 1.0       # measured / predicted compute time (kernel efficiency)
    host_scale: float | None = None  # measured / predicted host launch time (profiled floors, engine work);
                                     # None: compute_scale (one factor for both, as calibrations before it)
    comm_scale: float = 1.0          # measured / predicted communication time
    step_overhead_s: float = 0.0     # per-step cost the model lacks (launches, Python, logging)
    activation_scale: float = 1.0    # measured / predicted activation memory
    memory_offset_mb: float = 0.0    # per-rank memory the model lacks (allocator rounding, workspaces)
    # measured / predicted host time in a graphed run (plan.cuda_graphs): the layers' replays (GRAPHED_LAYER_HOST_MS)
    # and the engine's host work there; None: host. Fitted in host_scale's place when every calibration run was
    # graphed, since those runs do not time eager launches or eager runs' engine work (ViT-L's 0.78 applied to
    # eager ZeRO-3 hooks took those rows from -14 to -33 %)
    graphed_host_scale: float | None = None
    # measured / predicted host time of the graphed layers' replays alone (GRAPHED_LAYER_HOST_MS, an H200's
    # probe): from a graphed calibration run's own clock of its host (calibrate.fit_replay_host); None:
    # graphed_host. Apart from the engine's host work, which the replays' speed does not tell: on session 25's
    # H100s T5-L's 48 replays took half the probe's time while its ZeRO-2 hooks took what the engine block says
    replay_host_scale: float | None = None
    # the GPU lines' error growing with the micro-batch b: compute_scale * (b / compute_ref_batch) **
    # compute_batch_exp (0: none). The profile times each layer alone; in place, larger micro-batches ran
    # relatively slower than it said (T5-large on one H100: -4.5 % a doubling of b, session 21's sweep)
    compute_batch_exp: float = 0.0
    compute_ref_batch: float = 0.0

    def compute_at(self, b: float) -> float:
        """compute_scale at micro-batch b (per TP shard)."""
        if not self.compute_batch_exp or self.compute_ref_batch <= 0 or b <= 0:
            return self.compute_scale
        return self.compute_scale * (b / self.compute_ref_batch) ** self.compute_batch_exp

    @property
    def host(self) -> float:
        return self.compute_scale if self.host_scale is None else self.host_scale

    @property
    def graphed_host(self) -> float:
        return self.host if self.graphed_host_scale is None else self.graphed_host_scale

    @property
    def replay_host(self) -> float:
        return self.graphed_host if self.replay_host_scale is None else self.replay_host_scale

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: float(v) for k, v in (d or {}).items() if k in known and v is not None})


@dataclass(frozen=True)
class EngineCost:
    """What DeepSpeed's engine adds for one piece of the model (CostModel.engine_costs), in seconds."""

    microbatch_host_s: float = 0.0   # per micro-batch: hooks' host work (launch-bound engine block)
    microbatch_gpu_s: float = 0.0    # per micro-batch: what a GPU-bound step shows on the device (gradient copies,
                                     # waits that let the GPU run dry): the in-step timings
    step_s: float = 0.0              # per step, beyond the analytic optimizer: as a GPU-bound step exposes it
    step_serial_s: float = 0.0       # per step, host work and GPU work in series
    step_bytes_per_param: float = 0.0


class CostModel:
    """Predicts time and memory from a ModelSpec, a Hardware description and an optional model profile."""

    def __init__(self, spec: ModelSpec, hw: Hardware, profile=None, calibration: Calibration | None = None):
        self.spec, self.hw, self.profile = spec, hw, profile
        self.act_dtype = PRECISION_BYTES[spec.precision]
        if calibration is None:
            calibration = Calibration.from_dict(getattr(profile, "calibration", None))
        self.cal = calibration
        # The profile's launch floors, summed over a whole forward + backward, against that step measured in
        # train.py's own layers (the engine block's bare step at a launch-bound batch): how much slower the
        # host launches in place than the layers did alone (wrappers, one autograd graph, another host).
        ratio = profile.engine_host_ratio() if profile is not None and profile.asynchronous else None
        self.launch_scale = self.cal.host * (ratio or 1.0)
        self._other_ratio: dict[float, float] = {}

    # ------------------------------------------------------------------ collectives
    def allreduce_s(self, nbytes: float, size: int, consecutive: bool = True, stride: int = 1) -> float:
        """Ring all-reduce: 2(n-1)/n of the message crosses each rank's link, plus a fixed latency."""
        if size <= 1 or nbytes <= 0:
            return 0.0
        bw = self.hw.allreduce_busbw(size, consecutive, stride) * 1e9
        return self.cal.comm_scale * (self.hw.collective_latency_us * 1e-6 + 2 * (size - 1) / size * nbytes / bw)

    def gather_s(self, nbytes: float, size: int, consecutive: bool = True, stride: int = 1) -> float:
        """All-gather or reduce-scatter of a `nbytes` full tensor: (n-1)/n of it crosses each link."""
        if size <= 1 or nbytes <= 0:
            return 0.0
        bw = self.hw.allreduce_busbw(size, consecutive, stride) * 1e9
        return self.cal.comm_scale * (self.hw.collective_latency_us * 1e-6 + (size - 1) / size * nbytes / bw)

    def p2p_s(self, nbytes: float, pp: int, crosses_node: bool) -> float:
        if pp <= 1 or nbytes <= 0:
            return 0.0
        return self.cal.comm_scale * (self.hw.collective_latency_us * 1e-6
                                      + nbytes / (self.hw.p2p_bw(pp, crosses_node) * 1e9))

    def groups(self, setting: Setting, s: LayerStrategy) -> tuple[tuple[int, bool, int], tuple[int, bool, int]]:
        """(size, consecutive, stride) of the TP group and the DP group of a layer inside its stage."""
        per_stage = setting.world // setting.pp
        dp = per_stage // s.tp
        if s.tp_consecutive:
            return (s.tp, True, 1), (dp, dp == per_stage, s.tp)
        return (s.tp, s.tp == per_stage, dp), (dp, True, 1)

    # ------------------------------------------------------------------ compute
    def _analytic_s(self, flops: float) -> float:
        """No profile: FLOPs at the GEMM ceiling times the achieved share `analytic_mfu`."""
        return flops / (self.hw.compute_ceiling(self.spec.precision) * self.hw.analytic_mfu)

    def layer_compute_s(self, lt: LayerType, tp: int, b: float) -> tuple[float, float, float]:
        """(fwd, bwd, recompute) seconds of one layer for `b` samples on one TP shard."""
        prof = self.profile
        if prof is not None:
            scales = {"host": self.launch_scale, "gpu": self.cal.compute_at(b)}
            f = prof.layer_time_ms(lt.name, tp, b, "fwd", **scales)
            bw = prof.layer_time_ms(lt.name, tp, b, "bwd", **scales)
            rc = prof.layer_time_ms(lt.name, tp, b, "recompute", **scales)
            if f is not None and bw is not None:
                return f / 1e3, bw / 1e3, (rc if rc is not None else f) / 1e3
        # Analytic: TP splits the layer's FLOPs evenly; backward = 2x forward; recompute = 1 forward.
        fwd = self._analytic_s(lt.fwd_flops * b / tp) * self.cal.compute_at(b)
        return fwd, 2 * fwd, fwd

    def layer_act_bytes(self, lt: LayerType, tp: int, checkpoint: bool) -> float:
        prof = self.profile
        if prof is not None:
            v = prof.act_bytes(lt.name, tp, checkpoint)
            if v is not None:
                return float(v) * self.cal.activation_scale
        return float(lt.ckpt_bytes if checkpoint else lt.act_bytes[tp]) * self.cal.activation_scale

    def layer_workspace_bytes(self, lt: LayerType, tp: int, checkpoint: bool) -> float:
        """Per sample, what one layer adds while it runs backward: its measured backward workspace
        (profile_workspace.py) or, unmeasured, its full activations (Galvatron's assumption); a
        checkpointed layer first recomputes its full activations, so they come on top."""
        full = self.layer_act_bytes(lt, tp, False)
        v = self.profile.workspace_bytes(lt.name, tp) if self.profile is not None else None
        workspace = full if v is None else float(v) * self.cal.activation_scale
        return workspace + (full if checkpoint else 0.0)

    def graphed(self, setting: Setting, lt: LayerType, s: LayerStrategy) -> bool:
        """Whether this layer runs as a CUDA graph and is timed as one: the plan asks for graphs and train.py
        graphs the layer (TP 1, not checkpointed: backends/deepspeed/graphs.py), and the profile splits its
        host from its GPU time (a CPU profile or one without the split keeps the eager model)."""
        return (setting.cuda_graphs and s.tp == 1 and not s.checkpoint and self.profile is not None
                and self.profile.asynchronous and self.profile.layer_time_parts_ms(lt.name, 1, 1, "fwd") is not None)

    def graphed_lookup(self, lt: LayerType, b: float):
        """compute_parts_s's lookup for a graphed layer: the replay's host ms (GRAPHED_LAYER_HOST_MS, scaled by
        the calibration's replay host factor alone: it was measured in place, so the profile's in-place launch ratio
        does not apply) beside the profile's GPU line (the same eager kernels)."""
        def lookup(kind: str, _host: float, gpu: float) -> tuple[float, float]:
            _, g = self.profile.layer_time_parts_ms(lt.name, 1, b, kind, 1.0, gpu)
            return GRAPHED_LAYER_HOST_MS[kind] * self.cal.replay_host, g
        return lookup

    def compute_parts_s(self, lookup, kinds: tuple[str, ...], engine: EngineCost, m: int, serial: float,
                        serial_fwd: float, b: float, engine_factor: float = 1.0,
                        fwd_engine_factor: float = 0.0) -> tuple[float, float, float, float]:
        """(host s, GPU s, and the forward's share of each) per step of one piece's `kinds` ('fwd' first, 'bwd',
        'recompute') over m micro-batches, with the engine's per-micro-batch work (times `engine_factor`, of which
        `fwd_engine_factor` in the forward) on both sides: its hooks' host work, run while the GPU is still busy
        with the backward they follow, and what they put on the device. `lookup(kind, host, gpu)` gives the
        profile's (host ms, GPU ms) or None. Without them, or on a device the host does not run ahead of (a CPU
        profile): (0, serial, 0, serial_fwd), everything in series."""
        prof = self.profile
        if prof is None or not prof.asynchronous:
            return 0.0, serial, 0.0, serial_fwd
        parts = [lookup(kind, self.launch_scale, self.cal.compute_at(b)) for kind in kinds]
        if any(p is None for p in parts):
            return 0.0, serial, 0.0, serial_fwd
        eh, eg = engine.microbatch_host_s, engine.microbatch_gpu_s
        host, gpu = (sum(p[i] for p in parts) / 1e3 for i in (0, 1))
        return (m * (host + engine_factor * eh), m * (gpu + engine_factor * eg),
                m * (parts[0][0] / 1e3 + fwd_engine_factor * eh), m * (parts[0][1] / 1e3 + fwd_engine_factor * eg))

    @staticmethod
    def forward_hooks(setting: Setting) -> float:
        """The share of the engine's per-micro-batch hook work that runs in the forward: ZeRO-3's gathers
        (ZERO3_FORWARD_HOOK_SHARE); the other stages' hooks follow the backward's gradients."""
        return ZERO3_FORWARD_HOOK_SHARE if setting.zero == 3 else 0.0

    # ------------------------------------------------------------------ DeepSpeed's engine
    def other_gpu_ratio(self, b: float) -> float:
        """ModelProfile.other_gpu_ratio at micro-batch b (1 where not measured), once per b: the search asks for
        the embeddings and head of every candidate."""
        if b not in self._other_ratio:
            prof = self.profile
            r = prof.other_gpu_ratio(b) if prof is not None and prof.asynchronous else None
            self._other_ratio[b] = r or 1.0
        return self._other_ratio[b]

    def engine_costs(self, part: str, setting: Setting) -> EngineCost:
        """What DeepSpeed's engine adds for one layer of type `part` ('first'/'last': embeddings/head) at the
        setting's ZeRO stage.

        From the profile's engine block (autotune/profile_engine.py): the whole model's measured overheads at
        this stage times the part's share of parameter tensors (hooks and the optimizer's loops run per tensor).
        The launch-bound block gives the hooks' host work per micro-batch (a graphed setting's from the launch-bound
        graphed steps where they were timed: ModelProfile.graphed_hooks_ms) and the step with host and GPU in
        series; the in-step timings of a GPU-bound step (of the setting's mode, graphed or eager) give what
        the device shows: per micro-batch, how much later the last backward ended than at ZeRO-0, and the
        tail after it. The step overheads leave out the analytic optimizer time (bytes / memory bandwidth,
        `optimizer_s`), which shrinks with ZeRO sharding. Zeros without an engine block.
        """
        prof = self.profile
        stage = prof.engine_stage(setting.zero) if prof is not None else None
        share = prof.engine_tensor_share(part) if stage else None
        if not stage or share is None:
            return EngineCost()
        optimizer = self.optimizer_s(self.spec.params_total(1))
        # host work, measured in place (no launch_scale); a stage kept from an earlier block at that host's speed
        cal_host = self.cal.graphed_host if setting.cuda_graphs else self.cal.host
        k = cal_host * prof.engine_stage_host_speed(stage)
        mb_ms = float(stage.get("overhead_microbatch_ms", 0.0)) * prof.engine_stage_host_speed(stage)
        hooks = prof.graphed_hooks_ms(setting.zero) if setting.cuda_graphs and setting.zero else None
        if hooks is not None:       # a graphed step's hooks as timed in graphed steps (at the block's host speed
            stage0 = prof.engine_stage(0) or {}         # already), on ZeRO-0's engine work
            mb_ms = float(stage0.get("overhead_microbatch_ms", 0.0)) * prof.engine_stage_host_speed(stage0) + hooks
        mb_host = mb_ms / 1e3 * share * cal_host
        serial = max(0.0, float(stage.get("step_ms", 0.0)) / 1e3 - optimizer) * share * k
        mode = "graphed" if setting.cuda_graphs else "eager"
        now, ref = prof.engine_in_step(setting.zero, mode), prof.engine_in_step(0, mode)
        if now is None:
            step, mb_gpu = serial, 0.0
        else:
            step = max(0.0, now["tail_ms"] / 1e3 - optimizer) * share
            same = ref is not None and (ref["micro_batch"], ref["chunks"]) == (now["micro_batch"], now["chunks"])
            mb_gpu = max(0.0, now["device_backward_ms"] - ref["device_backward_ms"]) / 1e3 / now["chunks"] * share \
                if same else 0.0
        return EngineCost(mb_host, mb_gpu, step, serial, float(stage.get("step_transient_bytes_per_param", 0.0)))

    def optimizer_s(self, local_params: float) -> float:
        """Analytic Adam step of `local_params` parameters: its bytes at the device's memory bandwidth."""
        return local_params * OPTIMIZER_BYTES_PER_PARAM / (self.hw.mem_bw_gbps * 1e9)

    # ------------------------------------------------------------------ memory of model states
    def states_bytes(self, params: float, dp: int, zero: int) -> tuple[float, dict]:
        """(persistent bytes, detail) per rank for `params` parameters held by this rank before DP sharding.

        Persistent: alive through the whole step. detail["accum_grads"] is kept apart: gradient buffers
        that exist only from the first backward to the optimizer step (freed by it), so a single
        micro-batch's activation peak (start of backward) does not see them but the optimizer step and
        every later micro-batch of an accumulation do. Bytes per parameter as measured with train.py's
        engine on one H100 (autotune/profile_engine.py: states after a step, then before the next step):
          bf16/fp16  ZeRO-0: param 2 + fp32 master + Adam 12;        accumulated bf16 grads 2
                     ZeRO-1: param 2 + fp32 flat grad 4 + 12 / dp;   accumulated bf16 grads 2
                     ZeRO-2: param 2 + 12 / dp;                      accumulated fp32 grad partition 4 / dp
                     ZeRO-3: (param 2 + fp32 grad 4 + 12) / dp;      none
          fp32       ZeRO-0: param 4 + Adam 8;                       accumulated grads 4
                     ZeRO-1/2: param 4 + (fp32 partition copy 4 + Adam 8) / dp; grads 4 (ZeRO-2: 4 / dp)
                     ZeRO-3: (param 4 + grad 4 + Adam 8) / dp;       none
        """
        lowp = self.spec.precision in ("bf16", "fp16")
        if lowp:
            per = {0: (2, 0, 12, 2), 1: (2, 4, 12 / dp, 2), 2: (2, 0, 12 / dp, 4 / dp),
                   3: (2 / dp, 4 / dp, 12 / dp, 0)}[zero]
        else:
            per = {0: (4, 0, 8, 4), 1: (4, 0, 12 / dp, 4), 2: (4, 0, 12 / dp, 4 / dp),
                   3: (4 / dp, 4 / dp, 8 / dp, 0)}[zero]
        detail = {k: v * params for k, v in zip(("params", "grads", "optimizer", "accum_grads"), per)}
        return detail["params"] + detail["grads"] + detail["optimizer"], detail

    def lazy_state_bytes(self, params: float, dp: int, zero: int) -> float:
        """The part of states_bytes (`params` before DP sharding) that DeepSpeed's ZeRO-1/2 optimizers (BF16_Optimizer,
        stage_1_and_2) leave to the wrapped Adam's first step: its two fp32 moments, 8 B per local parameter.
        ZeRO-0's FP16_UnfusedOptimizer makes them at initialisation (a zero step); ZeRO-3 is never graphed. Only a
        graphed run's peak sees the difference: it comes in its first step (search.stage_memory). Allocator trace
        of BERT-L batch 32, graphed, one H100 (session 23): ZeRO-0 peaked with Adam's 394 moment pairs live, ZeRO-1
        and ZeRO-2 (20125 and 18847 MB) without their two flat moments; the three peaks 4 B/param apart."""
        return 8 * params / dp if zero in (1, 2) else 0.0

    def phases(self, states: float, detail: dict, chunks: int, zero: int) -> tuple[float, float, float]:
        """(bytes held through the activation phase, accumulated gradients that appear in backward, gradient
        buffer that appears in backward and is freed before the optimizer step), from states_bytes' result.

        With one micro-batch the accumulated gradients appear while backward frees the activations
        (stage_memory scans that); with several they are alive while later micro-batches hold activations,
        so they count with the states. fp32 ZeRO-2 with several micro-batches holds them twice in each later
        backward: DeepSpeed 0.19's stage-2 epilogue drops its gradient partition (`_release_ipg_buffers`:
        grads_in_partition = None) while `all_grad_tensors` keeps views of it as the running sum, so the
        next micro-batch's first bucket reduce allocates a new partition, added into the sum in its epilogue
        and then freed (engine profile of T5-large fp32: ZeRO-2 backward peak 4.3 B/param above ZeRO-1's).
        bf16/fp16 take the compact fp32 accumulation buffer instead, allocated once."""
        accum = detail["accum_grads"]
        if chunks == 1:
            return states, accum, 0.0
        regrad = accum if zero == 2 and self.spec.precision == "fp32" else 0.0
        return states + accum, 0.0, regrad

    @staticmethod
    def accum_flush_elems(zero: int) -> float:
        """ZeRO-2 allocates its whole fp32 gradient partition at the first bucket reduce (after this many
        gradient elements of backward); 0: gradients appear piece by piece as backward reaches them."""
        return REDUCE_BUCKET_ELEMS if zero == 2 else 0

    def zero_buffer_bytes(self, setting: Setting, stage_params: float) -> float:
        """Fixed DeepSpeed buffers per rank for the bucket sizes our generated config sets."""
        lowp = 2 if self.spec.precision in ("bf16", "fp16") else 4
        if setting.zero == 2:
            # Two reduce buckets with overlap_comm; capped by the stage's own gradients.
            return 2 * min(REDUCE_BUCKET_ELEMS, stage_params) * lowp
        if setting.zero == 1:
            return min(ALLGATHER_BUCKET_ELEMS, stage_params) * lowp
        if setting.zero == 3:
            # Prefetch bucket of gathered params + one reduce bucket.
            return (min(STAGE3_PREFETCH_ELEMS, stage_params) + min(REDUCE_BUCKET_ELEMS, stage_params)) * lowp
        return 0.0

    # ------------------------------------------------------------------ one layer
    def layer_cost(self, lt: LayerType, s: LayerStrategy, setting: Setting, stage: int) -> Cost:
        """Per-step time and per-rank memory of one layer under strategy `s` on pipeline stage `stage`."""
        b = setting.micro_batch(s.tp)
        m = setting.chunks
        (tp, tp_consec, tp_stride), (dp, dp_consec, dp_stride) = self.groups(setting, s)
        fwd, bwd, rc = self.layer_compute_s(lt, s.tp, b)
        lookup = lambda kind, h, g: self.profile.layer_time_parts_ms(lt.name, s.tp, b, kind, h, g)  # noqa: E731
        graphed = self.graphed(setting, lt, s)
        if graphed:
            lookup = self.graphed_lookup(lt, b)
            fwd, bwd = (max(lookup(k, self.cal.host, self.cal.compute_at(b))) / 1e3 for k in ("fwd", "bwd"))
        eng = self.engine_costs(lt.name, setting)
        # Recompute runs ZeRO-3's forward hooks again (gather, release): taken as the forward half of the
        # measured per-micro-batch hook work (backward's hooks gather again and reduce).
        hooks = 1 + ZERO3_FORWARD_HOOK_SHARE if s.checkpoint and setting.zero == 3 else 1.0
        engine_mb = hooks * max(eng.microbatch_host_s, eng.microbatch_gpu_s)
        compute = m * (fwd + bwd + (rc if s.checkpoint else 0.0) + engine_mb)
        host, gpu, host_fwd, gpu_fwd = self.compute_parts_s(
            lookup, ("fwd", "bwd", "recompute") if s.checkpoint else ("fwd", "bwd"), eng, m, compute, m * fwd, b,
            hooks, self.forward_hooks(setting))

        # Megatron TP: each forward all-reduce has one in backward; recompute repeats the forward ones.
        n_ar = lt.tp_allreduces_fwd * (2 + (1 if s.checkpoint else 0))
        tp_comm = m * n_ar * self.allreduce_s(lt.tp_allreduce_bytes * b, tp, tp_consec, tp_stride)

        shard = lt.params / s.tp
        grad_bytes = 4 if setting.zero >= 1 or self.spec.precision == "fp32" else 2
        lowp = 2 if self.spec.precision in ("bf16", "fp16") else 4
        coe = self.hw.overlap_coe
        exposed = tail = 0.0
        if dp > 1:
            if setting.zero == 0:
                # DeepSpeed ZeRO-0 all-reduces the accumulated gradients after the last micro-batch.
                tail = self.allreduce_s(shard * grad_bytes, dp, dp_consec, dp_stride)
            elif setting.zero == 1:
                # BF16_Optimizer: all-reduce fp32 grads at the boundary, then all-gather updated params.
                tail = (self.allreduce_s(shard * grad_bytes, dp, dp_consec, dp_stride)
                        + self.gather_s(shard * lowp, dp, dp_consec, dp_stride))
            elif setting.zero == 2:
                # Reduce-scatter on every micro-batch, overlapped with backward; params gathered after step.
                rs = self.gather_s(shard * lowp, dp, dp_consec, dp_stride)
                exposed = m * (overlap(rs, bwd, coe) - bwd)
                tail = self.gather_s(shard * lowp, dp, dp_consec, dp_stride)
            else:
                # ZeRO-3: all-gather in forward (prefetched under the previous layer) and again in backward,
                # reduce-scatter in backward; recompute gathers once more.
                ag = self.gather_s(shard * lowp, dp, dp_consec, dp_stride)
                rs = ag
                fwd_side = overlap(ag * (2 if s.checkpoint else 1), fwd + (rc if s.checkpoint else 0), coe) \
                    - (fwd + (rc if s.checkpoint else 0))
                bwd_side = overlap(ag + rs, bwd, coe) - bwd
                exposed = m * (fwd_side + bwd_side)
        zero_dp = setting.zero_divisor(s.tp)
        states, states_detail = self.states_bytes(shard, zero_dp, setting.zero)
        held, accum, regrad = self.phases(states, states_detail, setting.chunks, setting.zero)
        if graphed:
            # The copies of the layer's inputs the first step records for the capture (sample_of), kept as the
            # graphs' static inputs into which every replay copies the layer's inputs (the eager run's input, the
            # previous layer's output, stays alive beside them): from the first step's forward on. Without them
            # the H200's graphed peaks came out up to 4 % above the model (Swin-B, ViT-L), 5.4 MB a sample above
            # the gradient buffers for Swin-B, whose layers' inputs are 6.2 MB a sample (session 20).
            held += lt.boundary_bytes * b
        inflight = setting.inflight(stage)
        act = self.layer_act_bytes(lt, s.tp, s.checkpoint) * b * inflight
        if not s.checkpoint:
            # Tensors without a batch dimension (position-bias copies, masks, RNG state): once per micro-batch.
            act += lt.act_fixed_bytes.get(s.tp, 0) * self.cal.activation_scale * inflight
        transient = self.layer_workspace_bytes(lt, s.tp, s.checkpoint) * b   # while it runs backward
        # what the capture adds: static gradient buffers, one per parameter, and one micro-batch's activations
        graph = (shard * PRECISION_BYTES[self.spec.precision], act / inflight, transient) if graphed else (0.0,) * 3
        local = shard / zero_dp if setting.zero >= 1 else shard
        return Cost(compute_s=compute, host_s=host, gpu_s=gpu, host_fwd_s=host_fwd, gpu_fwd_s=gpu_fwd,
                    tp_comm_s=tp_comm, dp_exposed_s=exposed, dp_tail_s=tail,
                    optimizer_s=self.optimizer_s(local) + eng.step_s,
                    optimizer_host_s=self.optimizer_s(local) + eng.step_serial_s,
                    states_bytes=held, act_bytes=act, transient_bytes=transient,
                    accum_bytes=accum, regrad_bytes=regrad,
                    step_bytes=local * eng.step_bytes_per_param,
                    lazy_bytes=self.lazy_state_bytes(shard, zero_dp, setting.zero),
                    graph_static_bytes=graph[0], graph_act_bytes=graph[1], graph_transient_bytes=graph[2],
                    detail={"fwd_s": fwd, "bwd_s": bwd, "recompute_s": rc, "micro_batch": b, "shard_params": shard,
                            "engine_microbatch_s": engine_mb, "engine_step_s": eng.step_s, **states_detail})

    def redistribution_s(self, lt: LayerType, prev: LayerStrategy, nxt: LayerStrategy, setting: Setting) -> float:
        """Per-step cost of re-laying out the activation between two layers with different TP layouts.

        Galvatron's relocation: split along the batch over the smaller TP group (free), all-gather over
        the larger one (forward when TP grows, backward when it shrinks); one all-gather of the larger
        group's micro-batch per micro-batch. A layout change at equal TP is charged the same gather.
        """
        if (prev.tp, prev.tp_consecutive) == (nxt.tp, nxt.tp_consecutive):
            return 0.0
        big = nxt if nxt.tp >= prev.tp else prev
        (tp, consec, stride), _ = self.groups(setting, big)
        b = setting.micro_batch(big.tp)
        return setting.chunks * self.gather_s(lt.boundary_bytes * b, tp, consec, stride)

    # ------------------------------------------------------------------ embeddings and heads
    def other_cost(self, part: str, setting: Setting, stage: int, vtp: int) -> Cost:
        """Embeddings (`part`='first') or head + loss ('last'); with pp=1 both sit on stage 0."""
        o = self.spec.other
        params = (o.params_first if part == "first" else o.params_last)[vtp]
        if part == "last" and setting.pp == 1:
            params -= o.tied_params[vtp]  # a tied matrix is held once when first and last share a rank
        flops = o.fwd_flops_first if part == "first" else o.fwd_flops_last
        act_per_sample = (o.act_bytes_first if part == "first" else o.act_bytes_last)[vtp]
        b = setting.micro_batch(vtp)
        m = setting.chunks
        prof = self.profile
        fwd = bwd = None
        workspace = None
        scaled = False
        # GPU lines corrected to the in-place GPU time (ModelProfile.other_gpu_ratio) where measured
        ratio = self.other_gpu_ratio(b) if vtp == 1 else 1.0

        def lookup(kind: str, h: float, g: float) -> tuple[float, float] | None:
            return prof.other_time_parts_ms(part, vtp, b, kind, h, g * ratio)
        if prof is not None:
            fwd, bwd = (max(p) if (p := lookup(k, self.launch_scale, self.cal.compute_at(b))) else None
                        for k in ("fwd", "bwd"))
            scaled = fwd is not None and bwd is not None
            a = prof.other_act_bytes(part, vtp)
            if a is not None:
                act_per_sample = a
            workspace = prof.other_workspace_bytes(part, vtp)
        if not scaled:
            fwd = self._analytic_s(flops * b / vtp) * 1e3 * self.cal.compute_at(b)
            bwd = 2 * fwd
        fwd, bwd = fwd / 1e3, bwd / 1e3
        act_per_sample *= self.cal.activation_scale
        # while it runs backward: measured (profile_workspace.py), else its full activations
        workspace = act_per_sample if workspace is None else workspace * self.cal.activation_scale
        dp = setting.dp(vtp)
        shard = params / vtp
        lowp = 2 if self.spec.precision in ("bf16", "fp16") else 4
        grad_bytes = 4 if setting.zero >= 1 or self.spec.precision == "fp32" else 2
        tail = exposed = 0.0
        if dp > 1:
            if setting.zero <= 1:
                tail = self.allreduce_s(shard * grad_bytes, dp) + (self.gather_s(shard * lowp, dp) if setting.zero else 0)
            elif setting.zero == 2:
                exposed = m * (overlap(self.gather_s(shard * lowp, dp), bwd, self.hw.overlap_coe) - bwd)
                tail = self.gather_s(shard * lowp, dp)
            else:
                ag = self.gather_s(shard * lowp, dp)
                exposed = m * (overlap(ag, fwd, self.hw.overlap_coe) - fwd + overlap(2 * ag, bwd, self.hw.overlap_coe) - bwd)
        tp_comm = 0.0
        if vtp > 1 and part == "first":
            # Vocab-parallel embedding: one all-reduce of the embedding output per forward.
            tp_comm = m * self.allreduce_s(self.spec.layer(0).tp_allreduce_bytes * b, vtp)
        if vtp > 1 and part == "last":
            # Vocab-parallel cross-entropy: all-reduces of per-token max, sum and target logit (fp32).
            tp_comm = m * 3 * self.allreduce_s(4 * self.spec.layer(self.spec.num_layers - 1).seq_len * b, vtp)
        zero_dp = setting.zero_divisor(vtp)
        states, detail = self.states_bytes(shard, zero_dp, setting.zero)
        inflight = setting.inflight(stage)
        local = shard / zero_dp if setting.zero >= 1 else shard
        eng = self.engine_costs(part, setting)
        held, accum, regrad = self.phases(states, detail, setting.chunks, setting.zero)
        compute = m * (fwd + bwd + max(eng.microbatch_host_s, eng.microbatch_gpu_s))
        host, gpu, host_fwd, gpu_fwd = self.compute_parts_s(lookup, ("fwd", "bwd"), eng, m, compute, m * fwd, b,
                                                            fwd_engine_factor=self.forward_hooks(setting))
        return Cost(compute_s=compute, host_s=host, gpu_s=gpu, host_fwd_s=host_fwd, gpu_fwd_s=gpu_fwd,
                    tp_comm_s=tp_comm, dp_exposed_s=exposed, dp_tail_s=tail,
                    optimizer_s=self.optimizer_s(local) + eng.step_s,
                    optimizer_host_s=self.optimizer_s(local) + eng.step_serial_s,
                    states_bytes=held, act_bytes=act_per_sample * b * inflight,
                    transient_bytes=workspace * b, accum_bytes=accum, regrad_bytes=regrad,
                    step_bytes=local * eng.step_bytes_per_param,
                    lazy_bytes=self.lazy_state_bytes(shard, zero_dp, setting.zero),
                    detail={"params": params, "shard_params": shard, **detail})

    # ------------------------------------------------------------------ whole pipeline
    def p2p_stage_s(self, setting: Setting, stage: int, boundary_in: float, boundary_out: float,
                    b: float) -> float:
        """Per-micro-batch blocking send/recv of one stage: activations forward, gradients backward."""
        per_stage = setting.world // setting.pp
        crosses = per_stage >= self.hw.gpus_per_node or (stage * per_stage) // self.hw.gpus_per_node != \
            ((stage + 1) * per_stage) // self.hw.gpus_per_node
        t = 0.0
        if stage > 0:
            t += 2 * self.p2p_s(boundary_in * b, setting.pp, crosses)
        if stage < setting.pp - 1:
            t += 2 * self.p2p_s(boundary_out * b, setting.pp, crosses)
        return t

    def pipeline_time(self, setting: Setting, stage_costs: list[Cost], stage_p2p_s: list[float]) -> float:
        """1F1B step time: fill and drain through every stage once, then the slowest stage m-1 more times.

        A stage's per-micro-batch time is its compute + TP + exposed ZeRO time + its p2p; the gradient
        tail and optimizer run after the last micro-batch on every stage at once (max over stages).
        """
        m = setting.chunks
        per_mb = [c.microbatch_s / m + p for c, p in zip(stage_costs, stage_p2p_s)]
        body = sum(per_mb) + (m - 1) * max(per_mb)
        tail = max(c.dp_tail_s + c.optimizer_tail_s for c in stage_costs)
        return body + tail + self.cal.step_overhead_s

    def budget_bytes(self, gpu_memory_gb: float) -> float:
        """Bytes the caching allocator may hold at peak: device memory less context and fragmentation."""
        return gpu_memory_gb * 1024 * MB * (1 - FRAGMENTATION_RESERVE) - FRAMEWORK_OVERHEAD_BYTES
