"""Dry-run memory check: refuse a plan whose predicted peak does not fit before any model is built.

train.py calls `check_plan_memory` right after reading the plan; it needs only the model description
(no weights), so a doomed run fails in a second with a suggestion instead of an OOM minutes later.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from autotune.cost_model import MB
from autotune.hardware import Hardware
from autotune.plan import Plan, PlanError
from model_zoo.base import ModelSpec


@dataclass
class MemoryVerdict:
    ok: bool
    stage_peak_mb: list[float]
    budget_mb: float                     # what the caching allocator may hold (after context and reserve)
    gpu_memory_gb: float
    suggestions: list[str] = field(default_factory=list)

    def message(self) -> str:
        worst = max(range(len(self.stage_peak_mb)), key=lambda k: self.stage_peak_mb[k])
        head = (f"plan needs {self.stage_peak_mb[worst] / 1024:.2f} GB on pipeline stage {worst} but "
                f"{self.gpu_memory_gb:g} GB per device leaves {self.budget_mb / 1024:.2f} GB after the CUDA "
                f"context and fragmentation reserve")
        fix = "; ".join(self.suggestions[:3]) if self.suggestions else \
            "no single change fits: search a plan with `python autotune/search.py` for this memory"
        return f"{head}; try: {fix} (or pass --force to run anyway)"


def _runtime_hardware(world: int, gpu_memory_gb: float) -> Hardware:
    """Memory does not depend on bandwidths: any layout with the right world size will do."""
    return Hardware(name="runtime", nodes=1, gpus_per_node=world, gpu_memory_gb=gpu_memory_gb,
                    compute_tflops={"bf16": 1.0, "fp16": 1.0, "fp32": 1.0})


def _fits(searcher, plan: Plan) -> tuple[bool, list[float]]:
    ev = searcher.predict(plan)
    peaks = [m["total_mb"] for m in ev.stage_memory]
    return all(p * MB <= searcher.budget for p in peaks), peaks


def check_plan_memory(plan: Plan, spec: ModelSpec, gpu_memory_gb: float, profile=None,
                      hardware: Hardware | None = None) -> MemoryVerdict:
    from autotune.search import Searcher

    hw = hardware or _runtime_hardware(plan.world_size, gpu_memory_gb)
    searcher = Searcher(spec, hw, gpu_memory_gb, profile=profile)
    ok, peaks = _fits(searcher, plan)
    verdict = MemoryVerdict(ok, peaks, searcher.budget / MB, gpu_memory_gb)
    if not ok:
        verdict.suggestions = _suggestions(searcher, plan)
    return verdict


def _suggestions(searcher, plan: Plan) -> list[str]:
    """Single changes that make the plan fit, cheapest first: smaller micro-batch, checkpointing, ZeRO."""
    out = []
    local = plan.global_bsz // plan.dp_deg
    for chunks in (c for c in range(plan.chunks + 1, local + 1) if local % c == 0):
        trial = copy.deepcopy(plan)
        trial.chunks = chunks
        if _fits(searcher, trial)[0]:
            out.append(f"--chunks {chunks} (micro-batch {plan.global_bsz // (chunks * plan.dp_deg)})")
            break
    if not all(plan.checkpoint):
        trial = copy.deepcopy(plan)
        trial.checkpoint = [1] * plan.num_layers
        if _fits(searcher, trial)[0]:
            out.append("--checkpoint 1 (recompute every layer)")
    for stage in range(plan.zero_stage + 1, 2 if plan.pp_deg > 1 else 4):
        trial = copy.deepcopy(plan)
        trial.zero_stage = stage
        trial.dp_types_enc = [1 if stage == 3 else 0] * plan.num_layers
        try:
            trial.validate()
        except PlanError:
            continue
        if _fits(searcher, trial)[0]:
            out.append(f"--zero-stage {stage}")
            break
    return out
