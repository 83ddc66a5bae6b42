"""The plan file: Galvatron's key names, plus what DeepSpeed needs and what the run is checked against.

One module owns the schema. `Plan.load` accepts our files and Galvatron G2.4-style files (only its
keys); errors name the key and the fix.
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1
PRECISIONS = ("bf16", "fp16", "fp32")
PIPELINE_TYPES = ("pipedream_flush", "gpipe")
# Galvatron's default_dp_type, extended with zero1 (DeepSpeed stage 1); dp_types_enc=1 means ZeRO-3.
DP_TYPE_TO_STAGE = {"ddp": 0, "zero1": 1, "zero2": 2}
STAGE_TO_DP_TYPE = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero2"}


class PlanError(ValueError):
    """A plan file that cannot be used; the message names the key and the fix."""


def _csv(values: list[int]) -> str:
    return ",".join(str(int(v)) for v in values)


def _parse_list(raw: Any, key: str) -> list[int]:
    if isinstance(raw, (list, tuple)):
        items = list(raw)
    elif isinstance(raw, str):
        items = [x for x in raw.replace(" ", "").split(",") if x != ""]
    elif isinstance(raw, int):
        items = [raw]
    else:
        raise PlanError(f"plan key '{key}' must be a comma-separated string of integers, got {raw!r}")
    try:
        return [int(x) for x in items]
    except (TypeError, ValueError):
        raise PlanError(f"plan key '{key}' must hold integers only, got {raw!r}") from None


@dataclass
class Plan:
    """A layer-wise hybrid-parallel plan. Per-layer lists are over Transformer layers in model order."""

    pp_deg: int
    tp_sizes_enc: list[int]
    tp_consecutive_flags: list[int]
    dp_types_enc: list[int]
    checkpoint: list[int]
    global_bsz: int
    chunks: int
    pp_division: list[int]
    pipeline_type: str = "pipedream_flush"
    default_dp_type: str = "ddp"
    vtp: int = 1
    vsp: int = 0
    # --- added by Galvatron-DS ---
    zero_stage: int = 0
    precision: str = "bf16"
    # train.py replays each plain layer's eager kernels as a CUDA graph (backends/deepspeed/graphs.py); the cost
    # model then charges those layers a graph replay's host time instead of their kernel launches
    cuda_graphs: bool = False
    world_size: int | None = None
    model: dict = field(default_factory=dict)      # {"name": ..., "family": ..., "seq_len": ...}
    cluster: dict = field(default_factory=dict)    # {"nodes", "gpus_per_node", "gpu_memory_gb", "hardware"}
    predicted: dict | None = None
    search: dict | None = None
    schema_version: int = SCHEMA_VERSION

    # ---------------------------------------------------------------- derived quantities
    @property
    def num_layers(self) -> int:
        return len(self.tp_sizes_enc)

    @property
    def min_tp(self) -> int:
        return min(self.tp_sizes_enc) if self.tp_sizes_enc else 1

    def dp_of_layer(self, i: int) -> int:
        return self.world_size // self.pp_deg // self.tp_sizes_enc[i]

    @property
    def dp_deg(self) -> int:
        """Data-parallel degree of the layers with the smallest TP (the batch is split this many ways)."""
        return self.world_size // self.pp_deg // self.min_tp

    @property
    def micro_batch_size(self) -> int:
        """Samples per micro-batch per data-parallel replica."""
        return self.global_bsz // (self.chunks * self.dp_deg)

    def stage_of_layer(self) -> list[int]:
        out = []
        for stage, n in enumerate(self.pp_division):
            out += [stage] * n
        return out

    @property
    def uniform_tp(self) -> bool:
        return len(set(self.tp_sizes_enc)) <= 1 and len(set(self.tp_consecutive_flags)) <= 1

    # ---------------------------------------------------------------- construction
    @classmethod
    def uniform(cls, *, num_layers: int, world_size: int, pp: int = 1, tp: int = 1, zero_stage: int = 0,
                chunks: int = 1, global_bsz: int = 8, checkpoint: int | list[int] = 0,
                tp_consecutive: int = 1, vtp: int | None = None, precision: str = "bf16",
                pp_division: list[int] | None = None, model: dict | None = None) -> "Plan":
        """One strategy for every layer (Galvatron's GLOBAL config mode)."""
        ckpt = [int(checkpoint)] * num_layers if isinstance(checkpoint, int) else list(checkpoint)
        if pp_division is None:
            base, rem = divmod(num_layers, pp)
            pp_division = [base] * pp
            for k in range(rem):  # remainder on the last stages
                pp_division[pp - 1 - k] += 1
        plan = cls(pp_deg=pp, tp_sizes_enc=[tp] * num_layers, tp_consecutive_flags=[tp_consecutive] * num_layers,
                   dp_types_enc=[1 if zero_stage == 3 else 0] * num_layers, checkpoint=ckpt,
                   global_bsz=global_bsz, chunks=chunks, pp_division=pp_division,
                   default_dp_type=STAGE_TO_DP_TYPE[zero_stage], vtp=vtp or tp, zero_stage=zero_stage,
                   precision=precision, world_size=world_size, model=dict(model or {}))
        plan.validate()
        return plan

    # ---------------------------------------------------------------- validation
    def validate(self, world_size: int | None = None, num_layers: int | None = None) -> "Plan":
        """Check the plan is executable by the DeepSpeed/Megatron backend; raise PlanError naming the key."""
        if world_size is not None:
            if self.world_size is not None and self.world_size != world_size:
                raise PlanError(f"plan was made for world_size={self.world_size} but {world_size} ranks are running; "
                                f"launch {self.world_size} processes or search a plan for {world_size} GPUs")
            self.world_size = world_size
        W = self.world_size
        n = self.num_layers
        if num_layers is not None and n != num_layers:
            raise PlanError(f"plan key 'tp_sizes_enc' lists {n} layers but the model has {num_layers}; "
                            f"search a plan for this model")
        for key in ("tp_consecutive_flags", "dp_types_enc", "checkpoint"):
            if len(getattr(self, key)) != n:
                raise PlanError(f"plan key '{key}' has {len(getattr(self, key))} entries, expected {n} (one per layer)")
        if self.pp_deg < 1 or sum(self.pp_division) != n or len(self.pp_division) != self.pp_deg:
            raise PlanError(f"plan key 'pp_division' ({_csv(self.pp_division)}) must have pp_deg={self.pp_deg} "
                            f"entries summing to {n} layers")
        if any(x < 1 for x in self.pp_division):
            raise PlanError("plan key 'pp_division': every pipeline stage needs at least one layer")
        if self.precision not in PRECISIONS:
            raise PlanError(f"plan key 'precision' is {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if not isinstance(self.cuda_graphs, bool):
            raise PlanError(f"plan key 'cuda_graphs' is {self.cuda_graphs!r}; use true or false")
        if self.pipeline_type not in PIPELINE_TYPES:
            raise PlanError(f"plan key 'pipeline_type' is {self.pipeline_type!r}; use 'pipedream_flush' (1F1B)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise PlanError(f"plan key 'zero_stage' is {self.zero_stage}; use 0, 1, 2 or 3")
        if self.pp_deg > 1 and self.zero_stage > 1:
            raise PlanError(f"zero_stage={self.zero_stage} with pp_deg={self.pp_deg}: DeepSpeed pipelines allow ZeRO 0 "
                            f"or 1; set zero_stage to 1 or pp_deg to 1")
        if set(self.dp_types_enc) - {0, 1} or set(self.checkpoint) - {0, 1} or set(self.tp_consecutive_flags) - {0, 1}:
            raise PlanError("plan keys 'dp_types_enc', 'checkpoint', 'tp_consecutive_flags' take only 0 or 1")
        want_dp = [1 if self.zero_stage == 3 else 0] * n
        if self.dp_types_enc != want_dp:
            raise PlanError("plan key 'dp_types_enc' mixes ZeRO-3 and non-ZeRO-3 layers, which one DeepSpeed engine "
                            f"cannot run; use all {want_dp[0]} for zero_stage={self.zero_stage}")
        for t in self.tp_sizes_enc + [self.vtp, self.chunks, self.global_bsz]:
            if t < 1:
                raise PlanError("plan keys 'tp_sizes_enc', 'vtp', 'chunks', 'global_bsz' must be positive")
        if W is not None:
            if self.pp_deg > W or W % self.pp_deg:
                raise PlanError(f"plan key 'pp_deg'={self.pp_deg} does not divide world_size={W}; use a pipeline "
                                f"degree that divides the number of processes")
            for t in set(self.tp_sizes_enc) | {self.vtp}:
                if t & (t - 1) or (W // self.pp_deg) % t or W % self.pp_deg:
                    raise PlanError(f"TP degree {t} with pp_deg={self.pp_deg} does not factor world_size={W}; "
                                    f"use powers of two dividing {W // max(self.pp_deg, 1)}")
            if self.global_bsz % (self.chunks * self.dp_deg):
                raise PlanError(f"plan key 'global_bsz'={self.global_bsz} is not divisible by chunks*dp="
                                f"{self.chunks}*{self.dp_deg}; pick a multiple of {self.chunks * self.dp_deg}")
            if self.pp_deg > 1 and self.chunks < 1:
                raise PlanError("plan key 'chunks' must be >= 1")
        return self

    # ---------------------------------------------------------------- I/O
    def to_json_dict(self) -> dict:
        d = asdict(self)
        for key in ("tp_sizes_enc", "tp_consecutive_flags", "dp_types_enc", "checkpoint", "pp_division"):
            d[key] = _csv(d[key])
        d["micro_batch_size"] = self.micro_batch_size if self.world_size else None
        order = ["schema_version", "model", "cluster", "world_size", "pp_deg", "tp_sizes_enc", "tp_consecutive_flags",
                 "dp_types_enc", "checkpoint", "global_bsz", "chunks", "pp_division", "pipeline_type",
                 "default_dp_type", "vtp", "vsp", "zero_stage", "micro_batch_size", "precision", "cuda_graphs", "predicted",
                 "search"]
        return {k: d[k] for k in order}

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_json_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Read our schema or a Galvatron (G2.4) plan; unknown extra keys are ignored."""
        if not isinstance(d, dict):
            raise PlanError("a plan file must hold a JSON object")
        version = d.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise PlanError(f"plan 'schema_version' {version!r} is newer than this Galvatron-DS reads "
                            f"({SCHEMA_VERSION}); upgrade Galvatron-DS")
        for key in ("pp_deg", "tp_sizes_enc", "global_bsz", "chunks"):
            if key not in d:
                raise PlanError(f"plan key '{key}' is missing; a plan needs pp_deg, tp_sizes_enc, global_bsz, chunks")
        tp = _parse_list(d["tp_sizes_enc"], "tp_sizes_enc")
        n = len(tp)

        def per_layer(key: str, default: int) -> list[int]:
            if key not in d:
                return [default] * n
            vals = _parse_list(d[key], key)
            if len(vals) == 1 and n > 1:
                vals = vals * n
            return vals

        dp_types = per_layer("dp_types_enc", 0)
        default_dp_type = d.get("default_dp_type", "ddp")
        if default_dp_type not in DP_TYPE_TO_STAGE:
            raise PlanError(f"plan key 'default_dp_type' is {default_dp_type!r}; use ddp, zero1 or zero2")
        if "zero_stage" in d:
            zero_stage = int(d["zero_stage"])
        elif dp_types and all(x == 1 for x in dp_types):
            zero_stage = 3
        else:
            zero_stage = DP_TYPE_TO_STAGE[default_dp_type]
        if any(x for x in _parse_list(d.get("use_sp", "0"), "use_sp")):
            raise PlanError("plan key 'use_sp' asks for Ulysses sequence parallelism, which this backend does not "
                            "run; set use_sp to 0 for every layer")
        pp = int(d["pp_deg"])
        division = _parse_list(d["pp_division"], "pp_division") if "pp_division" in d else None
        if division is None:
            base, rem = divmod(n, pp)
            division = [base] * pp
            for k in range(rem):
                division[pp - 1 - k] += 1
        plan = cls(pp_deg=pp, tp_sizes_enc=tp, tp_consecutive_flags=per_layer("tp_consecutive_flags", 1),
                   dp_types_enc=dp_types, checkpoint=per_layer("checkpoint", 0), global_bsz=int(d["global_bsz"]),
                   chunks=int(d["chunks"]), pp_division=division,
                   pipeline_type=d.get("pipeline_type", "pipedream_flush"), default_dp_type=default_dp_type,
                   vtp=int(d.get("vtp", min(tp) if tp else 1)), vsp=int(d.get("vsp", 0)), zero_stage=zero_stage,
                   precision=d.get("precision", "bf16"), cuda_graphs=d.get("cuda_graphs", False),
                   world_size=d.get("world_size"),
                   model=dict(d.get("model") or {}), cluster=dict(d.get("cluster") or {}),
                   predicted=d.get("predicted"), search=d.get("search"), schema_version=SCHEMA_VERSION)
        if plan.vsp:
            raise PlanError("plan key 'vsp' asks for Ulysses on the vocabulary layers, which this backend does not "
                            "run; set vsp to 0")
        plan.validate()
        return plan

    @classmethod
    def load(cls, path: str) -> "Plan":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist; make one with `python autotune/search.py --out {path}`")
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {path} is not valid JSON ({e.msg} at line {e.lineno}); regenerate it") from None
        return cls.from_dict(d)

    def describe(self) -> str:
        """One line per distinct layer strategy, Galvatron style: pp-tp[*]-dp[f][-c] x count."""
        labels = []
        for i in range(self.num_layers):
            t = self.tp_sizes_enc[i]
            d = self.world_size // self.pp_deg // t if self.world_size else "?"
            labels.append(f"{self.pp_deg}-{t}{'*' if self.tp_consecutive_flags[i] and t > 1 else ''}-{d}"
                          f"{'f' if self.dp_types_enc[i] else ''}{'-c' if self.checkpoint[i] else ''}")
        return count_runs(labels)


def count_runs(labels: list[str]) -> str:
    """Runs of equal consecutive labels, Galvatron style: `a x3, b x1, a x2`."""
    return ", ".join(f"{label} x{len(list(run))}" for label, run in itertools.groupby(labels))


def write_text_atomic(path: str, text: str) -> None:
    """Write text to a temporary file in the same folder, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    """JSON (indented) written atomically (write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl_atomic(path: str, rows: list) -> None:
    """One JSON line per row, written atomically (write_text_atomic)."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
