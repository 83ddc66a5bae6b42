"""Search the fastest hybrid-parallel plan that fits in memory, and write plan.json + ds_config.json.

    python autotune/search.py --model bert-large --gpus 8 --gpu-memory-gb 40 --out plan.json

Outer loops (pp, tp, tp layout, ZeRO stage, chunks, global batch, pp_division candidates) around a
per-stage dynamic program (autotune/dp.py) that chooses per-layer strategies: activation
checkpointing, and in the default `layerwise` space also each layer's TP degree and rank layout.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace

if __package__ in (None, ""):  # run as `python autotune/search.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from autotune.cost_model import MB, Cost, CostModel, LayerStrategy, Setting, ordered_overlap
from autotune.dp import solve_stage
from autotune.hardware import Hardware
from model_zoo.base import ModelSpec, pow2_upto

SPACES = ("uniform", "layerwise", "dp", "zero3", "tp", "pp", "3d", "deepspeed")
BASELINE_SPACES = ("dp", "zero3", "tp", "pp", "3d")
MAX_CHUNKS = 128
# DP memory resolution: the stage budget is cut into this many units (see autotune/dp.py).
DP_UNITS = 4096


@dataclass(frozen=True)
class Candidate:
    """One point of the outer search: everything but the per-layer choices."""

    pp: int
    tp: int                  # 0: chosen per layer by the DP (layer-wise space)
    tp_consecutive: bool
    zero: int
    chunks: int
    global_bsz: int
    vtp: int = 0             # TP of embeddings and heads; 0: the layers' TP

    @property
    def layerwise(self) -> bool:
        return self.tp == 0

    def spaces(self, world: int) -> set[str]:
        """Restricted spaces (Galvatron's baselines) this candidate belongs to."""
        if self.layerwise:
            return {"layerwise"}
        out = {"uniform", "layerwise"}
        dp = world // self.pp // self.tp
        if self.pp == 1 and self.tp == 1 and self.zero == 0:
            out.add("dp")
        if self.pp == 1 and self.tp == 1 and self.zero == 3:
            out.add("zero3")
        if self.pp == 1 and dp == 1:
            out.add("tp")
        if self.tp == 1 and dp == 1:
            out.add("pp")
        if self.pp == 2 and self.tp == 2 and self.tp_consecutive:
            out.add("3d")
        if self.pp == 1 and self.tp == 1:
            out.add("deepspeed")
        return out


@dataclass
class Evaluated:
    cand: Candidate
    step_time_s: float
    samples_per_s: float
    pp_division: list[int]
    strategies: list[LayerStrategy]
    stage_costs: list[Cost]
    stage_memory: list[dict]
    spaces: set[str] = field(default_factory=set)

    @property
    def peak_mb(self) -> float:
        return max(m["total_mb"] for m in self.stage_memory)


def graphable(cand: Candidate, world: int) -> bool:
    """Whether train.py --cuda-graphs runs this candidate's layers as CUDA graphs (backends/deepspeed/graphs.py's
    scope_refusal; a per-layer TP candidate has cand.tp 0 and is not graphed)."""
    from backends.deepspeed.graphs import scope_refusal

    return cand.tp >= 1 and scope_refusal(world // cand.pp // cand.tp, cand.pp, cand.zero, cand.tp) is None


class SearchError(ValueError):
    """No plan exists for the request; the message says what to change."""


class Searcher:
    def __init__(self, spec: ModelSpec, hw: Hardware, gpu_memory_gb: float, profile=None,
                 space: str = "uniform", allow_checkpoint: bool = True, max_tp: int | None = None,
                 calibration=None, cuda_graphs: bool = False):
        self.spec, self.hw, self.space = spec, hw, space
        self.cuda_graphs = cuda_graphs    # time graphable candidates as train.py --cuda-graphs runs them
        self.cm = CostModel(spec, hw, profile, calibration)
        self.world = hw.world_size
        self.budget = self.cm.budget_bytes(gpu_memory_gb)
        self.allow_checkpoint = allow_checkpoint and space != "deepspeed"
        self.max_tp = max_tp or self.world
        self.evaluated = 0
        self._cost_cache: dict = {}
        self._partition_cache: dict = {}

    # ------------------------------------------------------------------ enumeration
    def candidates(self, batches: list[int]) -> list[Candidate]:
        W, L = self.world, self.spec.num_layers
        tps = [t for t in self.spec.valid_tp_degrees(min(self.max_tp, W))]
        out = []
        for B in batches:
            for pp in pow2_upto(min(W, L)):
                for tp in tps:
                    if W % (pp * tp):
                        continue
                    dp = W // pp // tp
                    if B % dp:
                        continue
                    zeros = [0, 1] if pp > 1 else [0, 1, 2, 3]
                    if dp == 1:
                        # Nothing to shard. With bf16/fp16 DeepSpeed's stage-1 engine (BF16_Optimizer) is the
                        # fast one (measured on an H100: BERT-large 0.137 s/step against 0.213 s at stage 0).
                        zeros = [1] if self.spec.precision in ("bf16", "fp16") else [0]
                    layouts = [True, False] if 1 < tp and dp > 1 else [True]
                    local = B // dp
                    for chunks in (c for c in range(1, min(local, MAX_CHUNKS) + 1) if local % c == 0):
                        for zero in zeros:
                            for consec in layouts:
                                c = Candidate(pp, tp, consec, zero, chunks, B)
                                if self.space in c.spaces(W):
                                    out.append(c)
        if self.space == "layerwise":
            out += self.layerwise_candidates(batches)  # after the uniform ones: their bounds prune these
        return out

    def layerwise_candidates(self, batches: list[int]) -> list[Candidate]:
        """TP chosen per layer; ZeRO <= 2 (the runtime averages replicated gradients per layer group)."""
        W, L = self.world, self.spec.num_layers
        # Layers passing head-split tensors along (T5) keep one layout per run of their type; a pipeline
        # stage boundary inside such a run would need the DP of two stages to agree, so pp = 1 only.
        fixed_runs = not all(lt.relayout_inside for lt in self.spec.layer_types)
        out = []
        for B in batches:
            for pp in pow2_upto(min(W, L)):
                per_stage = W // pp
                if W % pp or len(self.layer_tps(pp)) < 2 or B % per_stage or (fixed_runs and pp > 1):
                    continue
                local = B // per_stage
                # Vocabulary TP pays for text heads; vision heads are tiny, so they keep vtp = 1.
                cap = min(per_stage, self.max_tp, 8) if self.spec.other.vocab_size else 1
                vtps = [t for t in pow2_upto(cap) if t in self.spec.other.params_first]
                for chunks in (c for c in range(1, min(local, MAX_CHUNKS) + 1) if local % c == 0):
                    for zero in ([0, 1] if pp > 1 else [0, 1, 2]):
                        for vtp in vtps:
                            out.append(Candidate(pp, 0, True, zero, chunks, B, vtp))
        return out

    def layer_tps(self, pp: int) -> list[int]:
        """TP degrees some layer type accepts inside a stage of W/pp ranks."""
        cap = min(self.world // pp, self.max_tp)
        return [t for t in pow2_upto(cap) if any(lt.tp_ok(t) for lt in self.spec.layer_types)]

    def layerwise_strategies(self, pp: int) -> tuple[list[LayerStrategy], np.ndarray]:
        """Every (TP, layout, checkpoint) of a stage, and the layout group of each (for the DP)."""
        per_stage = self.world // pp
        layouts = []
        for t in self.layer_tps(pp):
            layouts.append((t, True))
            if 1 < t < per_stage:
                layouts.append((t, False))
        strategies, groups = [], []
        for g, (t, consec) in enumerate(layouts):
            for ck in ([False, True] if self.allow_checkpoint else [False]):
                strategies.append(LayerStrategy(t, consec, ck))
                groups.append(g)
        return strategies, np.array(groups)

    # ------------------------------------------------------------------ partitions
    def partitions(self, cand: Candidate, setting: Setting) -> list[list[int]]:
        """pp_division candidates: even, balanced for time, balanced for memory (cached per shape)."""
        pp, L = cand.pp, self.spec.num_layers
        if pp == 1:
            return [[L]]
        key = (pp, cand.tp, cand.tp_consecutive, cand.zero, setting.micro_batch(cand.tp or 1), min(cand.chunks, pp))
        if key not in self._partition_cache:
            self._partition_cache[key] = self._partitions(cand, setting)
        return self._partition_cache[key]

    def _partitions(self, cand: Candidate, setting: Setting) -> list[list[int]]:
        pp, L = cand.pp, self.spec.num_layers
        base = LayerStrategy(cand.tp or 1, cand.tp_consecutive, False)
        per_layer = [self.layer_costs(self.spec.layer_order[i], [base], setting, 0)[0] for i in range(L)]
        times = [c.microbatch_s for c in per_layer]
        states = [c.states_bytes for c in per_layer]
        acts = [c.act_bytes / setting.inflight(0) for c in per_layer]  # per in-flight micro-batch
        first = self.cm.other_cost("first", setting, 0, setting.vtp)
        last = self.cm.other_cost("last", setting, pp - 1, setting.vtp)
        even = [L // pp] * pp
        for k in range(L % pp):
            even[pp - 1 - k] += 1
        cands = [even,
                 balanced_split(times, [0.0] * L, pp, first.microbatch_s, last.microbatch_s),
                 balanced_split(states, acts, pp, first.states_bytes + first.act_bytes,
                                last.states_bytes + last.act_bytes,
                                stage_scale=[setting.inflight(k) for k in range(pp)])]
        out = []
        for c in cands:
            if c is not None and c not in out and all(x >= 1 for x in c):
                out.append(c)
        return out

    # ------------------------------------------------------------------ evaluate one candidate
    def evaluate(self, cand: Candidate, bound: float = math.inf) -> Evaluated | None:
        setting = Setting(self.world, cand.pp, cand.zero, cand.chunks, cand.global_bsz,
                          self.spec.precision, vtp=cand.vtp or cand.tp,
                          cuda_graphs=self.cuda_graphs and graphable(cand, self.world))
        self._cost_cache = {}  # entries are keyed by the setting: nothing carries over to the next candidate
        groups = None
        if cand.layerwise:
            strategies, groups = self.layerwise_strategies(cand.pp)
        else:
            strategies = [LayerStrategy(cand.tp, cand.tp_consecutive, False)]
            if self.allow_checkpoint:
                strategies.append(LayerStrategy(cand.tp, cand.tp_consecutive, True))
        best = None
        for division in self.partitions(cand, setting):
            res = self.evaluate_division(cand, setting, division, strategies, bound=bound, groups=groups)
            if res is not None and cand.layerwise and cand.zero >= 1:
                res = self.reprice_zero_group(cand, setting, division, strategies, groups, res, bound)
            if res is not None and (best is None or res.step_time_s < best.step_time_s):
                best = res
                bound = min(bound, res.step_time_s / cand.global_bsz)
        return best

    def evaluate_division(self, cand: Candidate, setting: Setting, division: list[int],
                          strategies: list[LayerStrategy], forced: list[int] | None = None,
                          bound: float = math.inf, groups: np.ndarray | None = None) -> Evaluated | None:
        """Best per-layer choices for one pp_division; with `forced` (strategy index per layer) only
        predict that assignment, whether or not it fits. Returns None when nothing fits, or when even
        the fastest choice per layer (memory ignored) cannot beat `bound` seconds per sample."""
        self.evaluated += 1
        stages, start = [], 0
        order = self.spec.layer_order
        for k, n in enumerate(division):
            layers = list(range(start, start + n))
            start += n
            counts = collections.Counter(order[i] for i in layers)
            by_type = {t: self.layer_costs(t, strategies, setting, k) for t in counts}
            costs = [by_type[order[i]] for i in layers]
            p2p = self.cm.p2p_stage_s(setting, k, self.spec.layer(layers[0]).boundary_bytes,
                                      self.spec.layer(layers[-1]).boundary_bytes,
                                      setting.micro_batch(cand.tp or min(s.tp for s in strategies)))
            stages.append((layers, costs, self.stage_fixed(setting, k, by_type, counts), p2p, by_type, counts))
        if forced is None and bound < math.inf:
            # Lower bound: every layer at its fastest choice, memory and redistribution ignored. Exact where the
            # fastest choice is also the fastest on the host and on the GPU (checkpointing adds to both); with
            # per-layer TP a slower choice could overlap better, which a test of pruning watches.
            fastest = [sum_costs([x for t, c in counts.items() for x in [min(by_type[t], key=Cost.time_of)] * c]
                                 + fixed["others"]) for _, _, fixed, _, by_type, counts in stages]
            if self.cm.pipeline_time(setting, fastest, [st[3] for st in stages]) / cand.global_bsz >= bound:
                return None
        chosen: list[LayerStrategy] = []
        stage_costs, stage_mem = [], []
        for k, (layers, costs, fixed, _, by_type, counts) in enumerate(stages):
            if forced is not None:
                res = [forced[i] for i in layers]
                picks = [costs[j][s] for j, s in enumerate(res)]
                fixed = self.stage_fixed(setting, k, by_type, counts, picks)
            else:
                res, picks, fixed = self.solve_stage_memory(setting, k, layers, costs, strategies, groups, fixed,
                                                            by_type, counts)
                if res is None:
                    return None
            chosen += [strategies[s] for s in res]
            stage_mem.append(stage_memory(picks, fixed))
            pieces = fixed["before"] + picks + fixed["after"]      # in the step's order
            total = sum_costs(pieces)
            relayout = sum(self.cm.redistribution_s(self.spec.layer(layers[j]), strategies[res[j - 1]],
                                                    strategies[res[j]], setting) for j in range(1, len(res)))
            total.compute_s += relayout
            total.gpu_s += relayout      # collectives: GPU time, whatever the host does meanwhile
            ordered = ordered_overlap(pieces, setting.chunks)
            if ordered is not None:
                total.ordered = (ordered[0] + relayout, ordered[1])
            stage_costs.append(total)
        step = self.cm.pipeline_time(setting, stage_costs, [st[3] for st in stages])
        return Evaluated(cand, step, cand.global_bsz / step, division, chosen, stage_costs, stage_mem,
                         cand.spaces(self.world))

    def reprice_zero_group(self, cand, setting, division, strategies, groups, res, bound):
        """Per-layer TP with ZeRO: the DP priced each layer's states sharded over the layer's own DP
        degree, but DeepSpeed shards all of them over the ranks identical in every layer (fewer, when TP
        degrees differ). Price the chosen plan with that group; if a stage then no longer fits, search
        again assuming no sharding (an upper bound) and price that plan exactly."""
        def exact(chosen: list[LayerStrategy]) -> Evaluated:
            D = self.zero_group(chosen, cand.vtp, setting)
            return self.evaluate_division(cand, replace(setting, zero_dp=D), division, strategies,
                                          forced=[strategies.index(s) for s in chosen])

        B = setting.world // setting.pp
        D = self.zero_group(res.strategies, cand.vtp, setting)
        if all(B // t == D for t in [s.tp for s in res.strategies] + [cand.vtp]):
            return res                     # one TP degree everywhere: the DP priced it exactly
        priced = exact(res.strategies)
        if priced.peak_mb * MB <= self.budget:
            return priced
        res = self.evaluate_division(cand, replace(setting, zero_dp=1), division, strategies, bound=bound,
                                     groups=groups)
        return None if res is None else exact(res.strategies)

    def zero_group(self, chosen: list[LayerStrategy], vtp: int, setting: Setting) -> int:
        from backends.megatron.layerwise import zero_group_size

        return zero_group_size([(s.tp, s.tp_consecutive) for s in chosen], vtp, setting.world // setting.pp)

    def solve_stage_memory(self, setting, k, layers, costs, strategies, groups, fixed, by_type, counts):
        """Run the DP against the stage budget, then check the exact fixed memory of the chosen
        strategies; if it is larger than the bound the DP assumed and the stage no longer fits,
        tighten the DP's budget by the excess and solve again (a few rounds, else give up)."""
        switch = self.switch_costs(layers, strategies, groups, setting) if groups is not None else None
        shrink = 0.0
        for _ in range(4):
            free = self.budget - fixed["bytes"] - shrink
            res = self.solve(costs, free, switch, groups) if free > 0 else None
            if res is None:
                return None, None, None
            picks = [costs[j][s] for j, s in enumerate(res)]
            exact = self.stage_fixed(setting, k, by_type, counts, picks)
            used = stage_memory(picks, exact)["total_mb"] * MB
            if used <= self.budget:
                return res, picks, exact
            shrink += used - self.budget
        return None, None, None

    def layer_costs(self, type_index: int, strategies: list[LayerStrategy], setting: Setting, stage: int) -> list[Cost]:
        """Costs of one layer type under each strategy; layers of a type on a stage share them (cached)."""
        key = (type_index, tuple(strategies), setting, setting.inflight(stage))
        hit = self._cost_cache.get(key)
        if hit is None:
            lt = self.spec.layer_types[type_index]
            hit = self._cost_cache[key] = [self.cm.layer_cost(lt, s, setting, stage) if self.usable(lt, s, setting)
                                           else UNUSABLE for s in strategies]
        return hit

    @staticmethod
    def usable(lt, s: LayerStrategy, setting: Setting) -> bool:
        """The layer accepts the TP degree and the micro-batch is a whole number of samples."""
        b = setting.micro_batch(s.tp)
        return lt.tp_ok(s.tp) and b >= 1 and b == int(b)

    def switch_costs(self, layers: list[int], strategies: list[LayerStrategy], groups: np.ndarray,
                     setting: Setting) -> np.ndarray:
        """[layers, G, G] redistribution cost between layout groups on each edge (0 into the first)."""
        G = int(groups.max()) + 1
        rep = [strategies[int(np.flatnonzero(groups == g)[0])] for g in range(G)]
        out = np.zeros((len(layers), G, G))
        for j in range(1, len(layers)):
            lt = self.spec.layer(layers[j])
            fixed = not lt.relayout_inside and self.spec.layer_order[layers[j - 1]] == self.spec.layer_order[layers[j]]
            for a in range(G):
                for b in range(G):
                    if a != b:
                        out[j, a, b] = math.inf if fixed else self.cm.redistribution_s(lt, rep[a], rep[b], setting)
        return out

    def stage_fixed(self, setting: Setting, k: int, by_type: dict[int, list[Cost]], counts: dict[int, int],
                    picks: list[Cost] | None = None) -> dict:
        """Memory of a stage outside the per-layer sum: embeddings/heads, ZeRO buckets, the transient
        of the layer in backward, the calibration offset. Buckets and transient depend on the chosen
        strategies only through their sizes: without `picks` the smallest over the usable choices is
        taken (a bound the DP starts from), with `picks` the exact value."""
        before = [self.cm.other_cost("first", setting, k, setting.vtp)] if k == 0 else []
        after = [self.cm.other_cost("last", setting, k, setting.vtp)] if k == setting.pp - 1 else []
        others = before + after
        if picks is None:
            usable = {t: [c for c in row if c is not UNUSABLE] for t, row in by_type.items()}
            layer_params = sum(counts[t] * min(c.detail["shard_params"] for c in row) for t, row in usable.items())
            layer_transient = max(min(c.transient_bytes for c in row) for row in usable.values())
        else:
            layer_params = sum(c.detail["shard_params"] for c in picks)
            layer_transient = max(c.transient_bytes for c in picks)
        buffers = self.cm.zero_buffer_bytes(setting, layer_params + sum(o.detail["shard_params"] for o in others))
        transient = max([layer_transient] + [o.transient_bytes for o in others])
        offset = self.cm.cal.memory_offset_mb * MB  # calibrated per-rank memory the model lacks
        fixed = sum(o.states_bytes + o.act_bytes for o in others) + buffers + transient + offset
        return {"bytes": fixed, "others": others, "before": before, "after": after, "inflight": setting.inflight(k),
                "accum_flush_elems": self.cm.accum_flush_elems(setting.zero),
                "buffers": buffers, "transient": transient, "offset": offset}

    def solve(self, costs: list[list[Cost]], free_bytes: float, switch: np.ndarray | None = None,
              groups: np.ndarray | None = None) -> list[int] | None:
        unit = max(free_bytes / DP_UNITS, 1.0)
        V = int(free_bytes // unit)
        t = np.array([[c.time_s for c in row] for row in costs])
        v = np.array([[V + 1 if math.isinf(c.states_bytes) else min(V + 1, math.ceil((c.states_bytes + c.act_bytes) / unit))
                       for c in row] for row in costs])
        res = solve_stage(t, v, V, switch, groups)
        return None if res is None else res.choice

    def predict(self, plan) -> Evaluated:
        """Time and memory of a given plan, fits or not: for dry-run checks and validation."""
        per_layer = [LayerStrategy(t, bool(c), bool(k)) for t, c, k in
                     zip(plan.tp_sizes_enc, plan.tp_consecutive_flags, plan.checkpoint)]
        strategies = sorted(set(per_layer), key=lambda s: (s.tp, not s.tp_consecutive, s.checkpoint))
        layouts = sorted({(s.tp, s.tp_consecutive) for s in strategies})
        groups = np.array([layouts.index((s.tp, s.tp_consecutive)) for s in strategies])
        uniform = len(layouts) == 1
        tp0, consec0 = layouts[0]
        cand = Candidate(plan.pp_deg, tp0 if uniform else 0, consec0 if uniform else True, plan.zero_stage,
                         plan.chunks, plan.global_bsz, plan.vtp)
        setting = Setting(self.world, cand.pp, cand.zero, cand.chunks, cand.global_bsz, self.spec.precision,
                          vtp=plan.vtp, cuda_graphs=plan.cuda_graphs)
        from backends.megatron.layerwise import LayerwiseLayout, needs_layerwise

        if needs_layerwise(plan):        # the runtime runs it layer-wise: ZeRO over DeepSpeed's one group
            setting = replace(setting, zero_dp=LayerwiseLayout.from_plan(plan).zero_dp)
        self._cost_cache = {}
        forced = [strategies.index(s) for s in per_layer]
        return self.evaluate_division(cand, setting, list(plan.pp_division), strategies, forced=forced,
                                      groups=None if uniform else groups)

    # ------------------------------------------------------------------ driver
    def run(self, batches: list[int], progress: bool = False, prune: bool = True) -> list[Evaluated]:
        cands = self.candidates(batches)
        results = []
        it = cands
        if progress:
            from tqdm import tqdm
            it = tqdm(cands, desc="search", unit="cfg", file=sys.stderr, leave=False)
        done_pp1: set[tuple] = set()
        inc = Incumbents(self.world)
        for c in it:
            key = (c.tp, c.tp_consecutive, c.zero, c.global_bsz)
            if c.pp == 1 and key in done_pp1:
                continue  # dominated: see below
            r = self.evaluate(c, inc.bound(c) if prune else math.inf)
            if r is not None:
                results.append(r)
                inc.add(r)
                # With pp = 1, more micro-batches only add per-micro-batch costs (every term grows with m at
                # a fixed batch) and save activation memory; once no layer needs checkpointing, larger
                # chunk counts cannot be faster. Candidates come in increasing chunk order.
                if c.pp == 1 and not any(s.checkpoint for s in r.strategies):
                    done_pp1.add(key)
        results.sort(key=lambda r: r.step_time_s / r.cand.global_bsz)
        return results


class Incumbents:
    """Branch and bound: the time per sample a candidate must beat to matter for the report.

    A candidate matters if it could be among the best 6 distinct plans (the plan and its 5
    alternatives) or the best of one of its restricted spaces; otherwise its DP is skipped.
    """

    def __init__(self, world: int, keep: int = 6):
        self.world, self.keep = world, keep
        self.by_key: dict[tuple, float] = {}
        self.space_best: dict[str, float] = {}

    def bound(self, cand: Candidate) -> float:
        vals = sorted(self.by_key.values())
        out = vals[self.keep - 1] if len(vals) >= self.keep else math.inf
        for sp in cand.spaces(self.world) - {"uniform"}:
            out = max(out, self.space_best.get(sp, math.inf))
        return out

    def add(self, ev: Evaluated) -> None:
        t = ev.step_time_s / ev.cand.global_bsz
        c = ev.cand
        key = (c.pp, c.tp, c.tp_consecutive, c.zero, c.global_bsz)
        self.by_key[key] = min(self.by_key.get(key, math.inf), t)
        for sp in ev.spaces:
            self.space_best[sp] = min(self.space_best.get(sp, math.inf), t)


# A strategy a layer cannot take (TP not dividing its heads, fractional micro-batch).
UNUSABLE = Cost(compute_s=math.inf, states_bytes=math.inf, act_bytes=math.inf, transient_bytes=0.0,
                detail={"shard_params": 0.0})


def sum_costs(costs: list[Cost]) -> Cost:
    out = Cost()
    for c in costs:
        out.compute_s += c.compute_s
        out.host_s += c.host_s
        out.gpu_s += c.gpu_s
        out.host_fwd_s += c.host_fwd_s
        out.gpu_fwd_s += c.gpu_fwd_s
        out.tp_comm_s += c.tp_comm_s
        out.dp_exposed_s += c.dp_exposed_s
        out.dp_tail_s += c.dp_tail_s
        out.optimizer_s += c.optimizer_s
        out.optimizer_host_s += c.optimizer_host_s
        out.states_bytes += c.states_bytes
        out.act_bytes += c.act_bytes
        out.transient_bytes = max(out.transient_bytes, c.transient_bytes)
        out.step_bytes += c.step_bytes
        out.accum_bytes += c.accum_bytes
        out.regrad_bytes += c.regrad_bytes
        out.lazy_bytes += c.lazy_bytes
        out.graph_static_bytes += c.graph_static_bytes
        out.graph_act_bytes += c.graph_act_bytes
        out.graph_transient_bytes = max(out.graph_transient_bytes, c.graph_transient_bytes)
    return out


def stage_memory(picks: list[Cost], fixed: dict) -> dict:
    """MB of one stage's peak by part: states and buffers, plus the larger of the activation phase and
    the optimizer step (accumulated gradients + the step's workspace), which are never live together.

    The activation phase is scanned through backward, last piece first: while a piece runs backward,
    the current micro-batch's activations of the pieces after it are freed, the piece adds its
    `transient_bytes` (its backward workspace, and a checkpointed layer's recomputed activations), and
    the gradients accumulated so far are held (all at once after the first bucket under ZeRO-2; the
    same for the second buffer of fp32 ZeRO-2 with accumulation, Cost.regrad_bytes).
    `picks` are the stage's layers in order; fixed["before"]/["after"] the embeddings/head around them."""
    seq = fixed.get("before", []) + picks + fixed.get("after", [])
    inflight, flush = fixed.get("inflight", 1), fixed.get("accum_flush_elems", 0)
    stored = sum(c.act_bytes for c in seq)
    accum_total = sum(c.accum_bytes for c in seq)
    regrad_total = sum(c.regrad_bytes for c in seq)
    peak, at_peak, freed, grads, elems = -1.0, (0.0, 0.0), 0.0, 0.0, 0.0
    for c in reversed(seq):
        elems += c.detail.get("shard_params", 0.0)
        if flush:          # ZeRO-2: the whole gradient partition appears at the first bucket reduce
            grads = accum_total + regrad_total if elems >= flush else 0.0
        else:
            grads += c.accum_bytes + c.regrad_bytes
        extra = c.transient_bytes - freed
        if stored + extra + grads > peak:
            peak, at_peak = stored + extra + grads, (extra, grads)
        freed += c.act_bytes / inflight
    parts = picks + fixed["others"]
    mem = {
        "model_states_mb": sum(c.states_bytes for c in parts) / MB,
        "activations_mb": stored / MB,
        "zero_buffers_mb": fixed["buffers"] / MB,
        "transient_mb": at_peak[0] / MB,          # workspace at the activation peak, less what backward freed
        "backward_grads_mb": at_peak[1] / MB,     # gradients accumulated by then
        "optimizer_step_mb": (accum_total + sum(c.step_bytes for c in parts)) / MB,
        "calibration_offset_mb": fixed["offset"] / MB,
    }
    act_phase = mem["activations_mb"] + mem["transient_mb"] + mem["backward_grads_mb"]
    phases = {"activations": act_phase, "optimizer_step": mem["optimizer_step_mb"]}    # a tie: the activations
    graph = sum_costs(parts)
    if graph.graph_static_bytes or graph.graph_act_bytes:
        # plan.cuda_graphs: the first step runs eager (recording the layers' inputs, held in the states) before the
        # optimizer has made its lazy states; then the capture, with them, holds one micro-batch's layer
        # activations in the graphs' pool while it records the backward of the last layer (its workspace), and
        # the static gradient buffers once every backward is recorded; later replays reuse the pool without
        # allocating, while the static buffers stay beside every later optimizer step. Every graphed run of session
        # 21's sweeps but the small-batch ones (where an optimizer step sets the peak) peaked in its first step.
        mem["lazy_states_mb"] = graph.lazy_bytes / MB
        mem["graph_static_mb"] = graph.graph_static_bytes / MB
        mem["graph_activations_mb"] = (graph.graph_act_bytes + graph.graph_transient_bytes) / MB
        mem["graph_capture_mb"] = max(mem["graph_activations_mb"], mem["graph_static_mb"])
        phases = {"activations": act_phase - mem["lazy_states_mb"], "optimizer_step":
                  mem["optimizer_step_mb"] + mem["graph_static_mb"], "capture_activations":
                  mem["graph_activations_mb"], "static_buffers": mem["graph_static_mb"]}
    peak = max(phases, key=phases.get)
    # what the calibration's activation factor scales: the activations (+ workspace) of the phase that sets the peak
    mem["peak_activations_mb"] = {"activations": mem["activations_mb"] + mem["transient_mb"],
                                  "capture_activations": mem.get("graph_activations_mb", 0.0)}.get(peak, 0.0)
    mem["total_mb"] = mem["model_states_mb"] + mem["zero_buffers_mb"] + mem["calibration_offset_mb"] + phases[peak]
    return mem


def balanced_split(fixed: list[float], scaled: list[float], parts: int, head: float = 0.0, tail: float = 0.0,
                   stage_scale: list[float] | None = None) -> list[int] | None:
    """Contiguous split into `parts` stages minimising the heaviest stage.

    Layer i weighs fixed[i] + scaled[i] * stage_scale[k] on stage k (activation memory scales with the
    1F1B in-flight count of the stage); `head` joins the first stage, `tail` the last. Binary search on
    the limit with a greedy left-to-right fill; extra stages are made by peeling single layers off.
    """
    n = len(fixed)
    if parts > n:
        return None
    scale = stage_scale or [1.0] * parts
    weights = [[fixed[i] + scaled[i] * scale[k] + (tail if i == n - 1 else 0.0) for i in range(n)]
               for k in range(parts)]
    prefix = [list(itertools.accumulate(w, initial=0.0)) for w in weights]

    def greedy(limit: float) -> list[int] | None:
        """Fill stage k with as many layers as fit (prefix sums + bisection); None if `limit` is too low."""
        sizes, i = [], 0
        for k in range(parts):
            room = limit - (head if k == 0 else 0.0)
            j = bisect.bisect_right(prefix[k], prefix[k][i] + room) - 1
            if j <= i:
                return None
            sizes.append(j - i)
            i = j
            if i == n:
                break
        if i < n:
            return None
        while len(sizes) < parts:  # splitting a stage never makes a stage heavier
            j = max(range(len(sizes)), key=lambda q: sizes[q])
            sizes[j:j + 1] = [sizes[j] - 1, 1]
        return sizes

    lo, hi = 0.0, (sum(fixed) + sum(scaled) * max(scale) + head + tail) * 1.000001 + 1e-12
    best = greedy(hi)
    while hi - lo > 1e-4 * hi:  # 0.01 % of the heaviest stage: far below the cost model's error
        mid = (lo + hi) / 2
        got = greedy(mid)
        if got is not None:
            best, hi = got, mid
        else:
            lo = mid
    return best


# ---------------------------------------------------------------------- plan building and report
def to_plan(ev: Evaluated, spec: ModelSpec, hw: Hardware, gpu_memory_gb: float, cuda_graphs: bool = False):
    """The plan file for an evaluated candidate, with its predictions; `cuda_graphs`: the search timed graphable
    candidates as CUDA graphs, and this plan says so when it is one."""
    from autotune.cost_model import FRAMEWORK_OVERHEAD_BYTES
    from autotune.plan import STAGE_TO_DP_TYPE, Plan

    c = ev.cand
    n = spec.num_layers
    recompute = sum(spec.layer(i).fwd_flops for i in range(n) if ev.strategies[i].checkpoint)
    flops = spec.train_flops_per_sample() + recompute
    plan = Plan(pp_deg=c.pp, tp_sizes_enc=[s.tp for s in ev.strategies],
                tp_consecutive_flags=[int(s.tp_consecutive) for s in ev.strategies],
                dp_types_enc=[1 if c.zero == 3 else 0] * n, checkpoint=[int(s.checkpoint) for s in ev.strategies],
                global_bsz=c.global_bsz, chunks=c.chunks, pp_division=list(ev.pp_division),
                default_dp_type=STAGE_TO_DP_TYPE[c.zero], vtp=c.vtp or c.tp, zero_stage=c.zero, precision=spec.precision,
                cuda_graphs=cuda_graphs and graphable(c, hw.world_size), world_size=hw.world_size,
                model={"name": spec.name, "family": spec.family, "num_layers": n,
                       "seq_len": spec.layer(0).seq_len, "params": spec.params_total(c.vtp or c.tp)},
                cluster={"hardware": hw.name, "nodes": hw.nodes, "gpus_per_node": hw.gpus_per_node,
                         "gpu_memory_gb": gpu_memory_gb})
    plan.predicted = {
        "step_time_s": round(ev.step_time_s, 6),
        "samples_per_s": round(ev.samples_per_s, 3),
        "tflops_per_gpu": round(flops * ev.samples_per_s / hw.world_size / 1e12, 2),
        "stage_peak_memory_mb": [round(m["total_mb"], 1) for m in ev.stage_memory],
        "stage_memory_breakdown_mb": [{k: round(v, 1) for k, v in m.items()} for m in ev.stage_memory],
        "framework_overhead_mb": FRAMEWORK_OVERHEAD_BYTES / MB,
        "stage_time_breakdown_s": [sc.time_breakdown(6) for sc in ev.stage_costs],
        "stage_bound": [sc.bound for sc in ev.stage_costs],
    }
    plan.validate()
    return plan


GRAPHS_MIN_GAIN = 0.01    # graphs must make the step this much faster to be kept (they cost memory, a capture)


def eager_if_graphs_do_not_pay(searcher: Searcher, best: Evaluated, plan) -> Evaluated | None:
    """The graphed `best` plan evaluated without graphs when they make it less than GRAPHS_MIN_GAIN faster (a
    GPU-bound plan gains nothing from them and holds their static gradient buffers), else None."""
    from dataclasses import replace

    eager = searcher.predict(replace(plan, cuda_graphs=False))
    return None if eager.step_time_s > best.step_time_s * (1 + GRAPHS_MIN_GAIN) else eager


def strategy_summary(ev: Evaluated, world: int) -> str:
    c = ev.cand
    ckpt = sum(s.checkpoint for s in ev.strategies)
    if c.layerwise:
        tps = sorted({s.tp for s in ev.strategies})
        par = f"tp=per-layer({'/'.join(map(str, tps))}) vtp={c.vtp}"
    else:
        dp = world // c.pp // c.tp
        layout = "" if c.tp == 1 or dp == 1 else ("" if c.tp_consecutive else " strided")
        par = f"tp={c.tp}{layout} dp={dp}"
    return (f"pp={c.pp} {par} zero={c.zero} chunks={c.chunks} bsz={c.global_bsz} "
            f"ckpt={ckpt}/{len(ev.strategies)} division={','.join(map(str, ev.pp_division))}")


def baseline_rows(results: list[Evaluated], best: Evaluated, world: int) -> list[dict]:
    """Best plan of each restricted space (Galvatron's baselines) and the searched plan's speed-up."""
    rows = []
    extra = ("uniform",) if best.cand.layerwise else ()
    for space in extra + BASELINE_SPACES + ("deepspeed",):
        members = [r for r in results if space in r.spaces]
        if not members:
            rows.append({"space": space, "samples_per_s": None, "speedup": None, "plan": "no plan fits"})
            continue
        r = max(members, key=lambda e: e.samples_per_s)
        rows.append({"space": space, "samples_per_s": round(r.samples_per_s, 3),
                     "speedup": round(best.samples_per_s / r.samples_per_s, 3), "plan": strategy_summary(r, world),
                     "peak_mb": round(r.peak_mb, 1)})
    return rows


def layout_key(ev: Evaluated) -> tuple:
    """What makes a plan a different idea: pp, ZeRO, batch and every layer's TP degree and layout (and the
    vocabulary's TP), not chunk counts or checkpointing; a layer-wise plan that gives every layer one
    degree is the uniform plan of that degree."""
    c = ev.cand
    layers = tuple((s.tp, s.tp == 1 or s.tp_consecutive) for s in ev.strategies)
    return c.pp, c.zero, c.global_bsz, layers, c.vtp or c.tp


def distinct_alternatives(results: list[Evaluated], k: int) -> list[Evaluated]:
    """The next-best plans, one per layout_key, none the best plan's."""
    seen, out = {layout_key(results[0])}, []
    for r in results[1:]:
        key = layout_key(r)
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
        if len(out) == k:
            break
    return out


def format_report(plan, best: Evaluated, rows: list[dict], alts: list[Evaluated], world: int,
                  sources: dict, seconds: float, n_evaluated: int) -> str:
    p = plan.predicted
    lines = [f"Galvatron-DS plan for {plan.model['name']} on {plan.cluster['hardware']} "
             f"({world} GPUs, {plan.cluster['gpu_memory_gb']} GB each, {plan.precision})",
             f"  strategy     {strategy_summary(best, world)}",
             f"  layers       {plan.describe()}",
             f"  predicted    {p['samples_per_s']:.1f} samples/s, step {p['step_time_s'] * 1e3:.1f} ms, "
             f"{p['tflops_per_gpu']:.1f} TFLOP/s per GPU"]
    if "host" in p["stage_bound"]:
        lines.append("  bound        kernel launches (the host) in stage(s) "
                     f"{', '.join(str(k) for k, b in enumerate(p['stage_bound']) if b == 'host')}: that step time "
                     "follows the CPU's speed, which moves 20-60 % on shared or virtual hosts")
    for k, m in enumerate(p["stage_memory_breakdown_mb"]):
        lines.append(f"  stage {k} mem  {m['total_mb'] / 1024:.2f} GB (states {m['model_states_mb'] / 1024:.2f}, "
                     f"activations {m['activations_mb'] / 1024:.2f}, buffers {m['zero_buffers_mb'] / 1024:.2f}, "
                     f"backward workspace {m['transient_mb'] / 1024:.2f}"
                     + (f", gradients in backward {m['backward_grads_mb'] / 1024:.2f}" if m.get("backward_grads_mb") else "")
                     + (f", optimizer step {m['optimizer_step_mb'] / 1024:.2f}" if m.get("optimizer_step_mb") else "")
                     + f") + {p['framework_overhead_mb'] / 1024:.1f} GB context")
    lines.append("  inputs       " + "; ".join(f"{k}: {v}" for k, v in sources.items()))
    lines.append("Best plan of each restricted space:")
    for r in rows:
        if r["samples_per_s"] is None:
            lines.append(f"  {r['space']:<9} no plan fits")
        else:
            lines.append(f"  {r['space']:<9} {r['samples_per_s']:>10.1f} samples/s  x{r['speedup']:.2f}  {r['plan']}")
    lines.append("Next-best alternatives:")
    for r in alts:
        lines.append(f"  {r.samples_per_s:>10.1f} samples/s  peak {r.peak_mb / 1024:.2f} GB  {strategy_summary(r, world)}")
    lines.append(f"Search: {n_evaluated} configurations in {seconds:.2f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="autotune/search.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bert-large", help="preset name, HF config .json, or HF checkpoint folder")
    ap.add_argument("--task", default=None, help="task head (default: the family's pre-training task)")
    ap.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: the hardware's)")
    ap.add_argument("--nodes", type=int, default=None, help="number of nodes (default: from --gpus)")
    ap.add_argument("--gpu-memory-gb", type=float, default=None, help="memory budget per GPU (default: the hardware's)")
    ap.add_argument("--global-batch-size", type=int, default=None, help="fixed global batch (default: searched)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample for text models")
    ap.add_argument("--hardware", default="8xH100", help="hardware preset or JSON from profile_hardware.py")
    ap.add_argument("--model-profile", default="auto",
                    help="JSON from autotune/profile_model.py; 'auto' (default): the profile the hardware preset "
                         "ships for this model and precision, if any (profiles/h100/ for the H100 presets); "
                         "'none': analytic times and activations")
    ap.add_argument("--space", default="layerwise", choices=SPACES,
                    help="search space: layerwise (default: per-layer TP, layout and checkpointing), uniform (one TP "
                         "degree), or a baseline: dp zero3 tp pp 3d deepspeed")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--max-tp", type=int, default=None, help="largest TP degree to consider")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="time one-GPU TP-1 ZeRO 0-2 candidates with their plain layers replayed as CUDA graphs, as "
                         "train.py runs a plan with cuda_graphs true (GPU; README)")
    ap.add_argument("--out", default="plan.json", help="plan file; ds_config.json is written beside it")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON instead of the report")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def pick_model_profile(choice: str, hw, model: str, spec) -> tuple:
    """(profile, path, why not) for --model-profile: a file; 'none': analytic; 'auto': the profile the
    hardware ships for this model preset and precision (Hardware.model_profiles), when it was measured at
    the model's sequence length and with its task head -- else analytic, and `why not` says why."""
    from autotune.model_profile import ModelProfile, shipped_profile

    if choice == "none":
        return None, None, ""
    if choice != "auto":
        return ModelProfile.load(choice), choice, ""
    path = shipped_profile(hw.model_profiles, model, spec.precision)
    if path is None:
        why = f"no profile shipped with {hw.name} for {model} in {spec.precision}" if hw.model_profiles else ""
        return None, None, why
    profile = ModelProfile.load(path)
    seq = spec.seq_lens[0] if spec.seq_lens else None
    if profile.seq_len != seq or profile.task != spec.task:
        return None, None, (f"the profile shipped with {hw.name} is for sequence length {profile.seq_len} and task "
                            f"{profile.task}, not {seq} and {spec.task}")
    return profile, path, ""


def default_batches(world: int) -> list[int]:
    """Global batches tried when none is given: the world size times 1, 2, 4, ... 64 (at most 4096)."""
    return sorted({min(world * 2 ** k, max(4096, world)) for k in range(7)})


def run_search(args: argparse.Namespace) -> tuple:
    """Everything but printing: returns (plan, report text, results)."""
    from autotune.hardware import load_hardware
    from autotune.model_profile import portable_path
    from model_zoo import get_model_spec

    t0 = time.perf_counter()
    hw = load_hardware(args.hardware)
    if args.gpus is not None or args.nodes is not None:
        hw = hw.with_layout(args.gpus or hw.world_size, args.nodes)
    mem = args.gpu_memory_gb if args.gpu_memory_gb is not None else hw.gpu_memory_gb
    if mem <= 0:
        raise SearchError(f"--gpu-memory-gb must be positive, got {mem}")
    spec = get_model_spec(args.model, precision=args.precision, seq_len=args.seq_len, task=args.task)
    profiled = any("profile_hardware.py" in str(v) for v in hw.sources.values())
    sources = {"hardware": f"{hw.name} ({'measured' if profiled else 'preset'})"}
    profile, profile_path, why = pick_model_profile(args.model_profile, hw, args.model, spec)
    if profile is not None:
        name = os.path.basename(profile_path) + (f", shipped with {hw.name}" if args.model_profile == "auto" else "")
        sources["layer times"] = f"measured ({name}, analytic where missing)"
        sources["activations"] = "measured saved tensors (analytic where missing)"
    else:
        sources["layer times"] = (f"analytic ({hw.analytic_mfu:.0%} of {hw.compute_tflops.get(args.precision, 0)} "
                                  f"TFLOP/s{'; ' + why if why else ''})")
        sources["activations"] = "analytic (model_zoo formulas)"
    if profile is not None and profile.engine:
        sources["engine overheads"] = f"measured per ZeRO stage ({os.path.basename(profile_path)})"
    else:
        sources["engine overheads"] = "not modelled (add them with autotune/profile_engine.py)"
    W = hw.world_size
    if args.global_batch_size is not None:
        if args.global_batch_size < 1:
            raise SearchError("--global-batch-size must be positive")
        batches = [args.global_batch_size]
    else:
        batches = default_batches(W)
    searcher = Searcher(spec, hw, mem, profile=profile, space=args.space, max_tp=args.max_tp,
                        cuda_graphs=args.cuda_graphs)
    results = searcher.run(batches, progress=not args.quiet and not args.json)
    if not results:
        raise SearchError(f"no {args.space} plan of {spec.name} fits in {mem} GB per GPU on {W} GPUs "
                          f"(global batch {'/'.join(map(str, batches))}); give more memory, more GPUs, "
                          f"a smaller --global-batch-size, or a wider --space")
    best = results[0]
    plan = to_plan(best, spec, hw, mem, cuda_graphs=args.cuda_graphs)
    if plan.cuda_graphs and (eager := eager_if_graphs_do_not_pay(searcher, best, plan)) is not None:
        best, plan = eager, to_plan(eager, spec, hw, mem)
    seconds = time.perf_counter() - t0
    rows = baseline_rows(results, best, W) if args.space in ("uniform", "layerwise") else []
    alts = distinct_alternatives(results, 5)
    plan.search = {"seconds": round(seconds, 3), "space": args.space, "configurations": searcher.evaluated,
                   "memory_resolution": f"stage budget / {DP_UNITS} per DP unit, layers rounded up",
                   "inputs": sources, "model_profile": portable_path(profile_path) if profile_path else None,
                   "baselines": rows,
                   "alternatives": [{"samples_per_s": round(r.samples_per_s, 3), "plan": strategy_summary(r, W)}
                                    for r in alts]}
    report = format_report(plan, best, rows, alts, W, sources, seconds, searcher.evaluated)
    return plan, report, results


def main(argv: list[str] | None = None) -> int:
    from autotune.hardware import HardwareError
    from autotune.plan import PlanError
    from backends.deepspeed.config import make_ds_config
    from model_zoo import ModelInputError

    args = parse_args(argv)
    try:
        plan, report, _ = run_search(args)
        ds_cfg = make_ds_config(plan)
    except (SearchError, HardwareError, ModelInputError, PlanError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from autotune.plan import write_json_atomic
    ds_path = os.path.join(os.path.dirname(os.path.abspath(args.out)), "ds_config.json")
    try:
        plan.save(args.out)
        write_json_atomic(ds_path, ds_cfg)
    except OSError as e:
        print(f"error: cannot write {args.out}: {e}; choose a writable --out", file=sys.stderr)
        return 2
    if args.json:
        import json
        print(json.dumps(plan.to_json_dict(), indent=2))
    else:
        print(report)
        print(f"Wrote {args.out} and {ds_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
