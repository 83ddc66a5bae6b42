"""The model profile: measured per-layer times and activation bytes that replace the analytic numbers.

Written by autotune/profile_model.py, read by the cost model through `ModelProfile`. Every accessor
returns None where the profile has no data, so the cost model falls back to its analytic numbers
for exactly that entry.

File format (JSON, `schema_version` 1):

    {
      "schema": "galvatron-ds/model-profile", "schema_version": 1,
      "model": "bert-large", "family": "bert", "task": "mlm", "precision": "bf16",
      "device": "NVIDIA H100 80GB HBM3", "device_type": "cuda",
      "seq_len": 512,                          # tokens per sample (T5: encoder; see "seq_lens")
      "seq_lens": [512],                       # every length (T5: [encoder, decoder]); [] for vision
      "batch_sizes": [1, 2, 4, 8, 16, 32],     # per-rank micro-batch sizes that were timed
      "time_fit": "t_ms(b) = c + m * b, ...",  # the fitted form (below)
      "fit_error": 0.011,                      # median relative error of all time fits at the profiled b
      "source": {"command": "...", "date": "2026-11-25", "torch": "...", "transformers": "...", ...},
      "layer_types": {
        "bert_enc": {
          "index": 0, "count": 24, "params": 12596224,
          "tp": {                              # TP degree -> the layer shape ONE TP rank computes
            "1": {"heads": 16, "ffn_hidden": 4096, "params": 12596224,
                  "time_ms": {"fwd": [...], "bwd": [...], "bwd_ckpt": [...]},   # per batch size, median
                  "gpu_ms": {...}, "cpu_ms": {...},   # CUDA layers: time_ms = max(cpu_ms, gpu_ms), same shape;
                                       # null where a point could not be split; absent in CPU profiles,
                                       # for embeddings/head and in files written before the split
                  "fits": {"fwd": {"c": 0.05, "m": 0.61, "floor": 0.0, "median_rel_err": 0.004, ...},
                                       # optional "floor_step": {"from_b": 5.66, "floor": 0.8}: a second floor
                           "bwd": {...}, "bwd_ckpt": {...}},
                  "act_bytes": 37748736,       # kept for backward, per sample
                  "ckpt_bytes": 1048576,       # kept per sample when the layer is checkpointed
                  "act_check": {...}}          # GPU: saved-tensor count vs allocator increase
          }
        }
      },
      "other": {"first": {"vtp": {"1": {... same time/fit/act fields ..., "params": 31782912}}},
                "last":  {"vtp": {"1": {...}}}},
      "vocab_size": 30522,                     # 0 for vision models: vtp does not change their modules
      "notes": ["..."],
      "calibration": {...},                    # autotune/calibrate.py: correction factors (optional)
      "engine": {"param_tensors": {"layers": {"bert_enc": 16}, "first": 5, "last": 5}, "tensors_total": 394,
                 "stages": {"0": {"overhead_microbatch_ms": 2.1, "step_ms": 40.3,
                                  "step_transient_bytes_per_param": 4.0, ...}, ...}}
                                               # autotune/profile_engine.py: DeepSpeed's own costs (optional)
    }

Fits: t_ms(b) = max(floor, c + m*b) (see TIME_FIT). Times are milliseconds of ONE layer (or one "other"
part) on one device for the whole micro-batch of b samples: forward, backward, and backward of the
checkpointed layer (which re-runs the forward). On CUDA a layer's time_ms is max(CPU launch time, GPU
time) per call, the steady cost inside a model whose CPU runs ahead of its GPU; gpu_ms and cpu_ms hold
the two parts. Recompute = fitted bwd_ckpt - fitted bwd. Activation bytes are per sample.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field, replace
from typing import Any

from autotune.plan import write_json_atomic

SCHEMA = "galvatron-ds/model-profile"
SCHEMA_VERSION = 1
TIME_KINDS = ("fwd", "bwd", "recompute")
MEASURED_KINDS = ("fwd", "bwd", "bwd_ckpt")
TIME_FIT = ("t_ms(b) = max(floor, c + m * b), c, m >= 0. Entries with gpu_ms/cpu_ms (layers profiled on CUDA): "
            "floor = median CPU launch time per call over the profiled batch sizes (two medians, floor below "
            "floor_step.from_b and floor_step.floor from it on, where the launch times of the small and large "
            "batches lie apart and differ by more than 25 %), c + m * b = least squares over "
            "the GPU times in relative error of the stored time (weights 1/time_ms^2), through the points whose GPU "
            "time is at least floor/2 (at least the 3 largest b). Other entries (CPU profiles, embeddings/head, "
            "older files): least squares over time_ms in relative error (weights 1/t^2); floor > 0 only where the "
            "smallest batches are launch-bound and the floor lowers the median error by more than 0.2 points")


class ProfileError(ValueError):
    """A model profile file that cannot be used; the message names the problem and the fix."""


# -------------------------------------------------------------------------------------------- fits
@dataclass(frozen=True)
class TimeFit:
    """t(b) = max(floor(b), c + m*b): a per-sample cost m, a fixed per-call cost c, and a floor for small
    batches where the layer is bound by kernel launches rather than by the GPU (floor 0 = plain line).
    The floor is one constant, or two (`floor` below `step_b`, `step_floor` from it on) where the CPU launch
    work itself changes with b: a library that switches kernels at a size (CUDA's embedding backward takes a
    sort-based path of more launches above 3072 indices)."""

    c: float
    m: float
    floor: float = 0.0
    median_rel_err: float = 0.0
    max_rel_err: float = 0.0
    step_b: float = math.inf
    step_floor: float = 0.0

    def floor_at(self, b: float) -> float:
        return self.step_floor if b >= self.step_b else self.floor

    def __call__(self, b: float, host: float = 1.0, gpu: float = 1.0) -> float:
        """ms at b; `host` and `gpu` scale the launch floor and the GPU line apart (a calibration's
        host_scale and compute_scale: the training host may launch slower or faster than the profiling one)."""
        return max(*self.parts(b, host, gpu))

    def parts(self, b: float, host: float = 1.0, gpu: float = 1.0) -> tuple[float, float]:
        """(host ms, GPU ms) at b: the launch floor and the GPU line apart. A step that never waits for the
        GPU overlaps the host's launches of later layers with the GPU's work on earlier ones, so the cost
        model sums each side over a micro-batch before it takes the larger (CostModel.layer_cost)."""
        return self.floor_at(b) * host, (self.c + self.m * b) * gpu

    def to_dict(self) -> dict:
        d = {"c": self.c, "m": self.m, "floor": self.floor, "median_rel_err": self.median_rel_err,
             "max_rel_err": self.max_rel_err}
        if math.isfinite(self.step_b):
            d["floor_step"] = {"from_b": self.step_b, "floor": self.step_floor}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TimeFit":
        step = d.get("floor_step") or {}
        return cls(float(d["c"]), float(d["m"]), float(d.get("floor", 0.0)), float(d.get("median_rel_err", 0.0)),
                   float(d.get("max_rel_err", 0.0)), float(step.get("from_b", math.inf)),
                   float(step.get("floor", 0.0)))


HALVED_SHARE = 0.6     # a GPU-bound point at half the batch takes at most this share of the time


def gpu_bound_points(bare: dict) -> tuple[list[int], list[float]]:
    """The engine block's bare GPU times (batch sizes, ms) at which the GPU set the pace: from the largest batch
    down, while each smaller one took at most HALVED_SHARE of the next larger one's time per halving (a GPU-bound
    whole model is nearly proportional to its batch; a launch-bound one stays flat: Swin-B's eager forward +
    backward took 94.0 ms at 64 and 94.1 at 128 on one H100, 174.5 at 256)."""
    pts = sorted(zip(bare.get("batch_sizes") or [], bare.get("gpu_ms") or []), reverse=True)
    keep = pts[:1]
    for b, t in pts[1:]:
        big_b, big_t = keep[-1]
        if t > big_t * HALVED_SHARE ** math.log2(big_b / b):
            break
        keep.append((b, t))
    keep.reverse()
    return [b for b, _ in keep], [t for _, t in keep]


def _line(bs: list[float], ts: list[float], ws: list[float] | None = None) -> tuple[float, float]:
    """Weighted least squares c + m*b, with c, m >= 0; weights 1/t^2 (relative error) unless given."""
    if len(bs) == 1:
        return 0.0, ts[0] / bs[0]
    w = ws if ws is not None else [1.0 / (t * t) if t > 0 else 0.0 for t in ts]
    sw = sum(w)
    swx = sum(wi * b for wi, b in zip(w, bs))
    swy = sum(wi * t for wi, t in zip(w, ts))
    swxx = sum(wi * b * b for wi, b in zip(w, bs))
    swxy = sum(wi * b * t for wi, b, t in zip(w, bs, ts))
    det = sw * swxx - swx * swx
    m = (sw * swxy - swx * swy) / det if det > 0 else 0.0
    c = (swy - m * swx) / sw if sw > 0 else 0.0
    if m < 0:
        return swy / sw, 0.0
    if c < 0:
        return 0.0, swxy / swxx
    return c, m


def _errors(fit: TimeFit, bs: list[float], ts: list[float]) -> list[float]:
    return [abs(fit(b) - t) / t for b, t in zip(bs, ts) if t > 0]


def fit_time(bs: list[float], ts: list[float]) -> TimeFit:
    """The line c + m*b, or max(floor, line) when the smallest batches sit on a launch-bound floor (time =
    max(CPU launch time, GPU time), the GPU part linear in b) and that lowers the median relative error by
    more than 0.2 points (the extra parameter must earn its place)."""
    if not bs:
        raise ValueError("no points to fit")
    pts = sorted(zip(bs, ts))
    bs, ts = [p[0] for p in pts], [p[1] for p in pts]
    line = TimeFit(*_line(bs, ts))
    line_err = statistics.median(_errors(line, bs, ts))
    best, best_err = line, line_err
    for k in range(1, len(bs) - 1):          # the first k points on the floor, a line through the rest
        cand = TimeFit(*_line(bs[k:], ts[k:]), statistics.median(ts[:k]))
        err = statistics.median(_errors(cand, bs, ts))
        if err < best_err:
            best, best_err = cand, err
    if line_err - best_err <= 0.002:
        best = line
    errs = _errors(best, bs, ts)
    return TimeFit(best.c, best.m, best.floor, statistics.median(errs), max(errs))


SPLIT_MIN_POINTS = 3   # the line of a split fit goes through at least this many points (the largest b)
STEP_MIN_JUMP = 0.25   # a two-level CPU floor: the levels differ by at least this share of the lower one ...
STEP_MIN_POINTS = 2    # ... with at least this many points on each level, the levels' points apart


def cpu_floor(cpu: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(floor, step_b, step_floor) of CPU launch times [(b, ms)] sorted by b: the median, one robust constant
    as launch work does not depend on b; or two medians split at the b where the launches change when
    every point below lies on one side of every point above (not scatter) and the levels differ by more than
    STEP_MIN_JUMP. The step sits at the geometric middle of the two b around it."""
    ms = [p[1] for p in cpu]
    best = (statistics.median(ms), math.inf, 0.0)
    best_spread = sum(abs(best[0] - x) / x for x in ms)
    for k in range(STEP_MIN_POINTS, len(cpu) - STEP_MIN_POINTS + 1):
        lo, hi = ms[:k], ms[k:]
        if not (max(lo) < min(hi) or min(lo) > max(hi)):
            continue
        f_lo, f_hi = statistics.median(lo), statistics.median(hi)
        if abs(f_hi - f_lo) < STEP_MIN_JUMP * min(f_lo, f_hi):
            continue
        spread = sum(abs(f_lo - x) / x for x in lo) + sum(abs(f_hi - x) / x for x in hi)
        if spread < best_spread:
            best, best_spread = (f_lo, math.sqrt(cpu[k - 1][0] * cpu[k][0]), f_hi), spread
    return best


def fit_split(bs: list[float], ts: list[float], gpu: list[float | None], cpu: list[float | None]) -> TimeFit:
    """t(b) = max(floor, c + m*b) from the two measured parts of time_ms = max(cpu, gpu): the floor is the CPU
    launch time per call (cpu_floor: one constant, or two levels where the launches change at a size); the
    line is the GPU time, fitted in relative error of the stored time (weights 1/time^2: a GPU point hidden
    under the floor counts no more than a visible one) through the points whose GPU time is at least half
    the floor (topped up with the largest b to SPLIT_MIN_POINTS): the GPU time of small batches, far under
    the floor, is not linear in b (kernels are latency-bound) and would only bend the line where it matters.
    Errors are reported against ts. Points without a split (None) are left out of both parts; with fewer
    than 2 split points this is fit_time(bs, ts)."""
    if not (len(bs) == len(ts) == len(gpu) == len(cpu)):
        raise ValueError("bs, ts, gpu and cpu must have one value per batch size")
    pts = sorted((b, t, g, c) for b, t, g, c in zip(bs, ts, gpu, cpu) if g is not None and c is not None and t > 0)
    if len(pts) < 2:
        return fit_time(bs, ts)
    floor, step_b, step_floor = cpu_floor([(p[0], p[3]) for p in pts])
    shape = TimeFit(0.0, 0.0, floor, step_b=step_b, step_floor=step_floor)
    keep = [p for p in pts if p[2] >= shape.floor_at(p[0]) / 2]
    keep += [p for p in reversed(pts) if p not in keep][:max(0, min(SPLIT_MIN_POINTS, len(pts)) - len(keep))]
    keep.sort()
    c, m = _line([p[0] for p in keep], [p[2] for p in keep], [1.0 / (p[1] * p[1]) for p in keep])
    fit = replace(shape, c=c, m=m)
    errs = _errors(fit, bs, ts)
    return replace(fit, median_rel_err=statistics.median(errs), max_rel_err=max(errs))


def fit_entry(bs: list[float], time_ms: dict, gpu_ms: dict | None = None, cpu_ms: dict | None = None) -> dict:
    """Fits of one entry's measured kinds: fit_split where the entry has both parts of a kind, else fit_time."""
    out = {}
    for k, ts in time_ms.items():
        if k not in MEASURED_KINDS or not bs:
            continue
        g, c = (gpu_ms or {}).get(k), (cpu_ms or {}).get(k)
        out[k] = fit_split(bs, ts, g, c) if g is not None and c is not None else fit_time(bs, ts)
    return out


# -------------------------------------------------------------------------------------------- entries
@dataclass
class Entry:
    """Measurements of one module shape (a layer at one TP degree, or an "other" part at one vtp)."""

    fits: dict[str, TimeFit] = field(default_factory=dict)   # keys from MEASURED_KINDS
    act_bytes: int | None = None
    ckpt_bytes: int | None = None
    params: int | None = None
    raw: dict = field(default_factory=dict)                    # everything else in the file, kept as is

    def time_ms(self, b: float, kind: str, host: float = 1.0, gpu: float = 1.0) -> float | None:
        if kind == "recompute":
            if "bwd_ckpt" not in self.fits or "bwd" not in self.fits:
                return None
            return max(0.0, self.fits["bwd_ckpt"](b, host, gpu) - self.fits["bwd"](b, host, gpu))
        fit = self.fits.get(kind)
        return None if fit is None else fit(b, host, gpu)

    def time_parts_ms(self, b: float, kind: str, host: float = 1.0, gpu: float = 1.0) -> tuple[float, float] | None:
        """(host ms, GPU ms) of `kind` at b (TimeFit.parts); 'recompute' is the checkpointed backward's
        excess over the plain one, side by side."""
        if kind == "recompute":
            if "bwd_ckpt" not in self.fits or "bwd" not in self.fits:
                return None
            (h1, g1), (h0, g0) = self.fits["bwd_ckpt"].parts(b, host, gpu), self.fits["bwd"].parts(b, host, gpu)
            return max(0.0, h1 - h0), max(0.0, g1 - g0)
        fit = self.fits.get(kind)
        return None if fit is None else fit.parts(b, host, gpu)

    def to_dict(self) -> dict:
        d = dict(self.raw)
        d["fits"] = {k: f.to_dict() for k, f in self.fits.items()}
        for key in ("act_bytes", "ckpt_bytes", "params"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Entry":
        if not isinstance(d, dict):
            raise ProfileError(f"{where} must be an object")
        fits = {}
        for k, f in (d.get("fits") or {}).items():
            if k not in MEASURED_KINDS:
                raise ProfileError(f"{where}.fits has unknown kind '{k}' (known: {', '.join(MEASURED_KINDS)})")
            try:
                fits[k] = TimeFit.from_dict(f)
            except (KeyError, TypeError, ValueError):
                raise ProfileError(f"{where}.fits.{k} must be {{\"c\": float, \"m\": float, ...}}; regenerate "
                                   f"the profile with autotune/profile_model.py") from None
        ints = {}
        for key in ("act_bytes", "ckpt_bytes", "params"):
            v = d.get(key)
            if v is not None and (not isinstance(v, (int, float)) or v < 0):
                raise ProfileError(f"{where}.{key} must be a non-negative number, got {v!r}")
            ints[key] = None if v is None else int(v)
        raw = {k: v for k, v in d.items() if k not in ("fits", "act_bytes", "ckpt_bytes", "params")}
        return cls(fits=fits, raw=raw, **ints)


@dataclass
class LayerTypeProfile:
    """One layer type: its count and exact parameters, and one Entry per profiled TP degree."""

    name: str
    index: int
    count: int
    params: int | None
    tp: dict[int, Entry] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"index": self.index, "count": self.count, "params": self.params,
                "tp": {str(t): e.to_dict() for t, e in sorted(self.tp.items())}}


# -------------------------------------------------------------------------------------------- profile
@dataclass
class ModelProfile:
    """A measured model profile. The cost model calls the accessors below (None = no data: use analytic)."""

    model: str
    family: str
    task: str
    precision: str
    device: str
    device_type: str
    seq_len: int | None
    seq_lens: list[int]
    batch_sizes: list[int]
    fit_error: float
    source: dict[str, Any]
    layer_types: dict[str, LayerTypeProfile]
    other: dict[str, dict[int, Entry]]          # "first" | "last" -> vtp -> Entry
    vocab_size: int = 0
    notes: list[str] = field(default_factory=list)
    # Correction factors fitted by autotune/calibrate.py from real runs; CostModel applies them.
    calibration: dict[str, Any] = field(default_factory=dict)
    # What DeepSpeed's engine adds per ZeRO stage (autotune/profile_engine.py); CostModel spreads it over layers.
    engine: dict[str, Any] = field(default_factory=dict)

    def layer_entries(self) -> list[Entry]:
        """Every (layer type, TP degree) entry."""
        return [e for lt in self.layer_types.values() for e in lt.tp.values()]

    def other_entries(self) -> list[Entry]:
        """Every embeddings ("first") and head ("last") entry, per vtp."""
        return [e for per in self.other.values() for e in per.values()]

    # ------------------------------------------------------------------ accessors for the cost model
    def layer_time_ms(self, layer_type_name: str, tp: int, micro_batch: float, kind: str,
                      host: float = 1.0, gpu: float = 1.0) -> float | None:
        """ms of ONE layer of that type on one device for `micro_batch` samples, TP-shard shape, no
        communication; kind 'fwd', 'bwd' or 'recompute' (the extra backward time when checkpointed).
        `host`/`gpu`: scales of the launch floor and the GPU line (TimeFit)."""
        e = self._layer_entry(layer_type_name, tp)
        return None if e is None or kind not in TIME_KINDS else e.time_ms(micro_batch, kind, host, gpu)

    def layer_time_parts_ms(self, layer_type_name: str, tp: int, micro_batch: float, kind: str,
                            host: float = 1.0, gpu: float = 1.0) -> tuple[float, float] | None:
        """(host ms, GPU ms) of layer_time_ms's time (Entry.time_parts_ms)."""
        e = self._layer_entry(layer_type_name, tp)
        return None if e is None or kind not in TIME_KINDS else e.time_parts_ms(micro_batch, kind, host, gpu)

    def act_bytes(self, layer_type_name: str, tp: int, checkpoint: bool) -> int | None:
        """Bytes kept for backward per sample by one layer (its input only when checkpointed)."""
        e = self._layer_entry(layer_type_name, tp)
        if e is None:
            return None
        return e.ckpt_bytes if checkpoint else e.act_bytes

    def workspace_bytes(self, layer_type_name: str, tp: int) -> int | None:
        """Bytes per sample one layer adds while it runs backward, as autotune/profile_workspace.py measured
        them (its checkpointed measurements are kept as a record; the cost model composes its own); None
        when not measured."""
        return _raw_int(self._layer_entry(layer_type_name, tp), "bwd_workspace_bytes")

    def other_workspace_bytes(self, part: str, vtp: int) -> int | None:
        """Bytes per sample the embeddings or head + loss add while they run backward; None when not measured."""
        return _raw_int(self._other_entry(part, vtp), "bwd_workspace_bytes")

    def other_time_ms(self, part: str, vtp: int, micro_batch: float, kind: str,
                      host: float = 1.0, gpu: float = 1.0) -> float | None:
        """ms of the embeddings (`part`='first') or head + loss ('last') for `micro_batch` samples."""
        e = self._other_entry(part, vtp)
        return None if e is None or kind not in TIME_KINDS else e.time_ms(micro_batch, kind, host, gpu)

    def other_time_parts_ms(self, part: str, vtp: int, micro_batch: float, kind: str,
                            host: float = 1.0, gpu: float = 1.0) -> tuple[float, float] | None:
        """(host ms, GPU ms) of other_time_ms's time (Entry.time_parts_ms)."""
        e = self._other_entry(part, vtp)
        return None if e is None or kind not in TIME_KINDS else e.time_parts_ms(micro_batch, kind, host, gpu)

    @property
    def asynchronous(self) -> bool:
        """Profiled on a device that runs behind the host (CUDA): the host's launches overlap the device's
        work. On a CPU the same thread does both, so their times add."""
        return self.device_type == "cuda"

    def other_act_bytes(self, part: str, vtp: int) -> int | None:
        e = self._other_entry(part, vtp)
        return None if e is None else e.act_bytes

    def params(self, layer_type_name: str) -> int | None:
        """Exact trainable parameters of one full (unsharded) layer of that type."""
        lt = self.layer_types.get(layer_type_name)
        return None if lt is None else lt.params

    def tp_degrees(self, layer_type_name: str) -> list[int]:
        lt = self.layer_types.get(layer_type_name)
        return sorted(lt.tp) if lt else []

    def engine_stage(self, zero: int) -> dict | None:
        """The engine block's measurements at one ZeRO stage (overhead_microbatch_ms, step_ms,
        step_transient_bytes_per_param, ...), or None when that stage was not measured."""
        return (self.engine.get("stages") or {}).get(str(int(zero))) if self.engine else None

    def engine_in_step(self, zero: int, mode: str) -> dict | None:
        """The in-step timings of one ZeRO stage in `mode` ('eager' or 'graphed': micro_batch, chunks, step_ms,
        device_backward_ms, tail_ms), or None where that stage and mode were not timed in a step."""
        stage = self.engine_stage(zero)
        return ((stage or {}).get("in_step") or {}).get(mode)

    def engine_launch_bound(self, zero: int, mode: str) -> dict | None:
        """The same steps as engine_in_step at the engine block's launch-bound micro-batch (profile_engine's
        `launch_bound`: host_backward_ms, when the host had queued the last backward), or None where not timed."""
        stage = self.engine_stage(zero)
        return ((stage or {}).get("launch_bound") or {}).get(mode)

    def graphed_hooks_ms(self, zero: int) -> float | None:
        """Host ms a micro-batch that ZeRO-`zero`'s hooks add over ZeRO-0's in a graphed step: the launch-bound
        graphed steps' host_backward_ms, stage minus ZeRO-0, over their micro-batches (at least 0), at this block's
        host speed (engine_stage_host_speed of the bare forward + backward timed beside those steps: they may have
        been timed apart from the block, on another host). None where either was not timed or they differ in micro-batch or chunks."""
        now, ref = self.engine_launch_bound(zero, "graphed"), self.engine_launch_bound(0, "graphed")
        if not now or not ref or (now["micro_batch"], now["chunks"]) != (ref["micro_batch"], ref["chunks"]) \
                or "host_backward_ms" not in now or "host_backward_ms" not in ref:
            return None
        return max(0.0, now["host_backward_ms"] - ref["host_backward_ms"]) / now["chunks"] \
            * self.engine_stage_host_speed(now)

    def other_gpu_ratio(self, b: float) -> float | None:
        """Measured over profiled GPU time of the embeddings and head together (TP 1) at micro-batch b: what the
        engine block's bare whole-model GPU times (`bare_gpu`, back to back at GPU-bound batches) leave after
        the layers' GPU lines, a line c + m b (c, m >= 0) through those residuals, over the two entries' own GPU
        lines at b. Those entries are timed in the HF task model in stream order, without a host/GPU split,
        so their GPU lines hold their launch time (~1 ms a phase where the GPU needs tens of microseconds:
        the vision models' patch embedding and pooled head); in a step whose host runs ahead that time hides.
        None without bare_gpu at two GPU-bound batch sizes (gpu_bound_points) or without the entries' fits."""
        bs, measured = gpu_bound_points((self.engine or {}).get("bare_gpu") or {})
        entries = [(lt.count, lt.tp.get(1)) for lt in self.layer_types.values()]
        others = [self._other_entry(part, 1) for part in ("first", "last")]
        if len(bs) < 2 or any(e is None or not {"fwd", "bwd"} <= set(e.fits) for _, e in entries) or \
                any(e is None or not {"fwd", "bwd"} <= set(e.fits) for e in others):
            return None

        def gpu(e: Entry, x: float) -> float:
            return sum(e.fits[k].parts(x)[1] for k in ("fwd", "bwd"))

        residual = [t - sum(n * gpu(e, x) for n, e in entries) for x, t in zip(bs, measured)]
        c, m = _line([float(x) for x in bs], [max(r, 0.0) for r in residual], [1.0] * len(bs))
        own = sum(gpu(e, b) for e in others)
        return (c + m * b) / own if own > 0 else None

    def engine_stage_host_speed(self, stage: dict) -> float:
        """The factor on an engine stage's overheads (`stage`: engine_stage's dict) for this block's host: the
        block's bare forward + backward (launch-bound: the host's speed) over the bare time the stage was measured
        beside, when a partial re-measurement kept the stage from an earlier block (profile_engine.
        keep_unmeasured_stages; below 1 when this block's host ran faster); 1 for a stage measured with the block.
        The engine's overheads are host work (hooks, per-tensor loops), so a kept stage's are scaled by it: session
        21's H100 ran BERT-L's bare step in 30.7 ms where the 2026-11-25 one, whose ZeRO-1 and ZeRO-3 stages were
        kept, took 59.6."""
        now, then = (self.engine or {}).get("bare_microbatch_ms"), stage.get("bare_microbatch_ms")
        return now / then if now and then else 1.0

    def engine_tensor_share(self, part: str) -> float | None:
        """Share of the model's parameter tensors in one layer of type `part`, or in 'first'/'last'."""
        if not self.engine:
            return None
        t = self.engine.get("param_tensors") or {}
        n = t.get(part) if part in ("first", "last") else (t.get("layers") or {}).get(part)
        total = self.engine.get("tensors_total")
        return None if n is None or not total else n / total

    def engine_host_ratio(self) -> float | None:
        """The engine block's bare forward + backward (train.py's layers, no engine, at its launch-bound
        micro-batch) over the sum of this profile's launch floors for the same step (every layer and the
        embeddings/head, TP 1): > 1 when the layers launch slower in place than alone. None without an
        engine block, a launch-split fit at TP 1, or where that step is not launch-bound (GPU sum above)."""
        e = self.engine or {}
        bare, b = e.get("bare_microbatch_ms"), e.get("micro_batch")
        entries = [(lt.count, lt.tp.get(1)) for lt in self.layer_types.values()]
        entries += [(1, self._other_entry(part, 1)) for part in ("first", "last")]
        if not bare or not b or any(en is None or not {"fwd", "bwd"} <= set(en.fits) for _, en in entries):
            return None
        parts = [en.fits[k].parts(b) for _, en in entries for k in ("fwd", "bwd")]
        counts = [n for n, _ in entries for _ in (0, 1)]
        host = sum(n * h for n, (h, _) in zip(counts, parts))
        gpu = sum(n * g for n, (_, g) in zip(counts, parts))
        return bare / host if host > gpu else None

    def _layer_entry(self, name: str, tp: int) -> Entry | None:
        lt = self.layer_types.get(name)
        return None if lt is None else lt.tp.get(int(tp))

    def _other_entry(self, part: str, vtp: int) -> Entry | None:
        per_vtp = self.other.get(part)
        if not per_vtp:
            return None
        if int(vtp) not in per_vtp and self.vocab_size == 0:
            # Vision models have no vocabulary: the embedding/head modules are the same at any vtp.
            return per_vtp.get(1)
        return per_vtp.get(int(vtp))

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "model": self.model, "family": self.family, "task": self.task, "precision": self.precision,
            "device": self.device, "device_type": self.device_type, "seq_len": self.seq_len,
            "seq_lens": self.seq_lens, "batch_sizes": self.batch_sizes, "time_fit": TIME_FIT,
            "fit_error": self.fit_error, "source": self.source, "vocab_size": self.vocab_size,
            "layer_types": {n: lt.to_dict() for n, lt in self.layer_types.items()},
            "other": {p: {"vtp": {str(v): e.to_dict() for v, e in sorted(d.items())}} for p, d in self.other.items()},
            "notes": self.notes,
            **({"calibration": self.calibration} if self.calibration else {}),
            **({"engine": self.engine} if self.engine else {}),
        }

    @staticmethod
    def set_block(path: str, key: str, block: dict) -> None:
        """Put one top-level block ("calibration", "engine") into the profile file at `path`, atomically,
        leaving every other key as written (a tool that adds to a profile does not re-serialise the rest)."""
        with open(path) as f:
            raw = json.load(f)
        raw[key] = block
        write_json_atomic(path, raw)

    def save(self, path: str) -> None:
        """Atomic: a temporary file in the same folder, then os.replace (never a half-written profile)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "ModelProfile":
        if not os.path.isfile(path):
            raise ProfileError(f"model profile {path} does not exist; create it with autotune/profile_model.py "
                               f"--model NAME --out {path}")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ProfileError(f"model profile {path} is not valid JSON ({e.msg}, line {e.lineno}); "
                               f"regenerate it with autotune/profile_model.py") from None
        return cls.from_dict(d, origin=f"model profile {path}")

    @classmethod
    def from_dict(cls, d: Any, origin: str = "model profile") -> "ModelProfile":
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ProfileError(f"{origin} is not a model profile (no \"schema\": \"{SCHEMA}\"); "
                               f"give a file written by autotune/profile_model.py")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ProfileError(f"{origin} has schema_version {d.get('schema_version')!r}, this code reads "
                               f"{SCHEMA_VERSION}; regenerate it with autotune/profile_model.py")
        missing = [k for k in ("model", "precision", "device", "layer_types") if k not in d]
        if missing:
            raise ProfileError(f"{origin} lacks key(s) {', '.join(missing)}; regenerate it with "
                               f"autotune/profile_model.py")
        if not isinstance(d["layer_types"], dict):
            raise ProfileError(f"{origin}: 'layer_types' must be an object of layer type name -> data")
        layer_types = {name: _layer_type_from_dict(name, v, origin) for name, v in d["layer_types"].items()}
        other: dict[str, dict[int, Entry]] = {}
        for part, v in (d.get("other") or {}).items():
            if part not in ("first", "last"):
                raise ProfileError(f"{origin}: other.{part} is unknown; use 'first' (embeddings) or 'last' (head)")
            other[part] = {_int_key(k, f"{origin}: other.{part}.vtp"): Entry.from_dict(e, f"{origin}: other.{part}.vtp.{k}")
                           for k, e in ((v or {}).get("vtp") or {}).items()}
        return cls(model=str(d["model"]), family=str(d.get("family", "")), task=str(d.get("task", "")),
                   precision=str(d["precision"]), device=str(d["device"]),
                   device_type=str(d.get("device_type", "")), seq_len=d.get("seq_len"),
                   seq_lens=list(d.get("seq_lens") or []), batch_sizes=[int(b) for b in d.get("batch_sizes") or []],
                   fit_error=float(d.get("fit_error", 0.0)), source=dict(d.get("source") or {}),
                   layer_types=layer_types, other=other, vocab_size=int(d.get("vocab_size") or 0),
                   notes=list(d.get("notes") or []), calibration=dict(d.get("calibration") or {}),
                   engine=dict(d.get("engine") or {}))


def _raw_int(entry: Entry | None, key: str) -> int | None:
    v = None if entry is None else entry.raw.get(key)
    return None if v is None else int(v)


def _int_key(k: Any, where: str) -> int:
    try:
        v = int(k)
    except (TypeError, ValueError):
        raise ProfileError(f"{where} key {k!r} must be a positive integer (a TP degree)") from None
    if v < 1:
        raise ProfileError(f"{where} key {k!r} must be a positive integer (a TP degree)")
    return v


def _layer_type_from_dict(name: str, v: Any, origin: str) -> LayerTypeProfile:
    where = f"{origin}: layer_types.{name}"
    if not isinstance(v, dict) or not isinstance(v.get("tp"), dict):
        raise ProfileError(f"{where} must be an object with a 'tp' object (TP degree -> measurements)")
    tp = {_int_key(k, f"{where}.tp"): Entry.from_dict(e, f"{where}.tp.{k}") for k, e in v["tp"].items()}
    params = v.get("params")
    return LayerTypeProfile(name=name, index=int(v.get("index", 0)), count=int(v.get("count", 0)),
                            params=None if params is None else int(params), tp=tp)


# -------------------------------------------------------------------------------------------- shipped files
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shipped_profile(folders: dict[str, str], model: str, precision: str) -> str | None:
    """The profile a hardware preset ships for a model preset at a precision: folders maps precision to a
    folder relative to the repository root (Hardware.model_profiles), holding <model>.json. None if absent."""
    folder = folders.get(precision)
    if not folder or os.sep in model:        # a config or checkpoint path is no preset
        return None
    path = os.path.join(REPO_ROOT, folder, f"{model}.json")
    return path if os.path.isfile(path) else None


def portable_path(path: str) -> str:
    """How a plan records a profile: relative to the repository root when inside it (the same checkout on
    every node), else absolute."""
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO_ROOT) if full.startswith(REPO_ROOT + os.sep) else full


def find_profile(recorded: str) -> str | None:
    """A profile path as a plan records it (portable_path), found as given or under the repository root."""
    for path in (recorded, os.path.join(REPO_ROOT, recorded)):
        if os.path.isfile(path):
            return path
    return None


# -------------------------------------------------------------------------------------------- report
def split_fit_errors(profile: "ModelProfile") -> tuple[float | None, float | None]:
    """(GPU part, CPU part) of the split-timed layer entries, each a median relative error over all points:
    the fit form fitted to the GPU times alone (how well t(b) describes what the GPU does), and the CPU
    launch times about their entry's floor (a constant: launch work does not depend on b, so this is the
    host's scatter). None without split timing. time_ms = max(cpu, gpu) inherits whichever dominates."""
    gpu, cpu = [], []
    for lt in profile.layer_types.values():
        for e in lt.tp.values():
            bs = e.raw.get("batch_sizes", [])
            for k in MEASURED_KINDS:
                g, c = (e.raw.get("gpu_ms") or {}).get(k), (e.raw.get("cpu_ms") or {}).get(k)
                pts = [(b, gi, ci) for b, gi, ci in zip(bs, g or [], c or []) if gi and ci]
                if len(pts) < 3:          # two points fit any line: no evidence either way
                    continue
                gpu += _errors(fit_time([p[0] for p in pts], [p[1] for p in pts]), [p[0] for p in pts],
                               [p[1] for p in pts])
                floor = statistics.median(p[2] for p in pts)
                cpu += [abs(floor - p[2]) / p[2] for p in pts]
    return (statistics.median(gpu) if gpu else None), (statistics.median(cpu) if cpu else None)


def fit_errors(profile: "ModelProfile") -> dict[str, float | None]:
    """Median relative error over every fitted point of every time fit ("all"), of the layers' alone and of
    the embeddings' and head's alone (None where there are none)."""
    def points(entries: list[Entry]) -> list[float]:
        out = []
        for e in entries:
            for kind, fit in e.fits.items():
                for b, t in zip(e.raw.get("batch_sizes", []), e.raw.get("time_ms", {}).get(kind, [])):
                    if t > 0:
                        out.append(abs(fit(b) - t) / t)
        return out

    layers, other = points(profile.layer_entries()), points(profile.other_entries())
    return {name: (statistics.median(v) if v else (0.0 if name == "all" else None))
            for name, v in (("all", layers + other), ("layers", layers), ("other", other))}


def report(paths: list[str]) -> str:
    """Markdown tables of fit errors and of the activation cross-check (saved tensors vs GPU allocator)."""
    fits = ["| model | device | precision | layer types x TP | median fit error | layers | embeddings/head | "
            "worst fit point | GPU part | CPU launch scatter |", "|---|---|---|---|---|---|---|---|---|---|"]
    acts = ["| model | layer type | TP | batch | saved-tensor bytes | allocator: requested | difference | "
            "allocator: allocated blocks | difference |", "|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        p = ModelProfile.load(path)
        worst = max((f.max_rel_err for e in p.layer_entries() + p.other_entries() for f in e.fits.values()),
                    default=0.0)
        n = sum(len(lt.tp) for lt in p.layer_types.values())
        gpu, cpu = (format(x, ".2%") if x is not None else "-" for x in split_fit_errors(p))
        errs = fit_errors(p)
        lay, oth = (format(errs[k], ".2%") if errs[k] is not None else "-" for k in ("layers", "other"))
        fits.append(f"| {p.model} | {p.device} | {p.precision} | {n} | {p.fit_error:.2%} | {lay} | {oth} | "
                    f"{worst:.2%} | {gpu} | {cpu} |")
        for name, lt in p.layer_types.items():
            for tp, e in sorted(lt.tp.items()):
                chk = e.raw.get("act_check")
                if chk:
                    req = chk.get("allocator_requested_bytes")
                    acts.append(f"| {p.model} | {name} | {tp} | {chk['batch']} | {chk['saved_bytes']:,} | "
                                f"{'-' if req is None else format(req, ',')} | "
                                f"{'-' if req is None else format(chk['rel_diff'], '+.2%')} | "
                                f"{chk['allocator_bytes']:,} | {chk.get('rel_diff_allocated', chk['rel_diff']):+.2%} |")
    return "\n".join(fits) + "\n\n" + "\n".join(acts) + "\n"


if __name__ == "__main__":
    import sys
    if len(sys.argv) < 2:
        print("usage: python -m autotune.model_profile PROFILE.json [...]  (prints fit and activation tables)")
        sys.exit(2)
    try:
        print(report(sys.argv[1:]), end="")
    except ProfileError as e:
        print(f"model_profile: error: {e}", file=sys.stderr)
        sys.exit(2)
