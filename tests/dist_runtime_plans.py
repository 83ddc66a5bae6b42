"""Train several plans in one launch (one process per rank) and record losses next to a reference.

Process start-up dominates on CPU, so one launch runs many plans: for each case the Megatron
groups are rebuilt, the model is rebuilt from the same full state dict, and a DeepSpeed engine
trains `--steps` steps on the deterministic synthetic data. Rank 0 also trains the plain HF model
(single process, fp32, torch AdamW with the same hyper-parameters, clipping at 1.0) on the same
global batches. Usage (under tests/dist_launcher.run_ranks or torchrun):

    python tests/dist_runtime_plans.py --cases '[{"model": "bert-test", "plan": {"tp": 2}}]' --out r.json
"""
from __future__ import annotations

import argparse
import json
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from autotune.plan import Plan  # noqa: E402
from backends.data import SyntheticData  # noqa: E402
from backends.deepspeed.engine import build_engine  # noqa: E402
from backends.megatron.groups import build_parallel_groups, destroy_parallel_groups, init_distributed  # noqa: E402
from backends.megatron.random import seed_everything  # noqa: E402
from model_zoo.registry import FAMILIES, PRESETS, load_hf_config  # noqa: E402
from model_zoo.runtime import get_adapter  # noqa: E402
from tests.dist_launcher import finish_launch, gloo_threads, record_case, train_hf_reference  # noqa: E402

SEED = 1234
DATA_SEED = 7


def reference(adapter, config, task, state, args, seq_len) -> dict:
    """The plain HF model trained on the whole global batch in one process."""
    batches = (adapter.synthetic_batch(config, task, args.global_batch, DATA_SEED, step, seq_len=seq_len)
               for step in range(args.steps))
    losses, norms = train_hf_reference(adapter, adapter.build_model(config, task, state), batches, args.lr,
                                       weight_decay=args.weight_decay, eps=args.eps)
    return {"loss": losses, "grad_norm": norms}


def run_case(adapter, config, task, state, plan: Plan, args, seq_len) -> dict:
    groups = build_parallel_groups(plan)
    seed_everything(SEED, groups.rng_rank, groups.pp_rank)
    model = adapter.build_model(config, task, state)
    adapter.tensor_parallelize(model, task, groups.tp_groups)
    trainer = build_engine(plan, groups, adapter.layer_sequence(model, task), lr=args.lr,
                           weight_decay=args.weight_decay, eps=args.eps)
    data = SyntheticData(adapter, config, task, plan, groups.dp_rank, DATA_SEED, seq_len=seq_len)
    data.share = groups.batch_share
    results = [trainer.train_step(data.micro_batches(step)) for step in range(args.steps)]
    trainer.destroy()
    destroy_parallel_groups()
    return {"loss": [r.loss for r in results], "grad_norm": [r.grad_norm for r in results],
            "gloo_threads": gloo_threads()}


def make_plan(kw: dict, num_layers: int, world: int, global_bsz: int) -> Plan:
    """Plan.uniform kwargs, plus per-layer `tp_sizes` and `tp_consecutive_flags` lists (layer-wise TP)."""
    kw = dict(kw)
    per_layer = {key: kw.pop(src) for src, key in (("tp_sizes", "tp_sizes_enc"),
                                                   ("tp_consecutive_flags", "tp_consecutive_flags")) if src in kw}
    plan = Plan.uniform(num_layers=num_layers, world_size=world, global_bsz=global_bsz, precision="fp32", **kw)
    for key, values in per_layer.items():
        setattr(plan, key, list(values))
    return plan.validate()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True,
                   help="JSON list of {model, task?, seq_len?, config?, plan: Plan.uniform kwargs}; model: a preset "
                        "or an HF config path; seq_len (default: the preset's) e.g. [32, 16] for T5; config: HF "
                        "config overrides (e.g. dropout on), such cases get no HF reference")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eps", type=float, default=1e-8)
    args = p.parse_args()
    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    cases = json.loads(args.cases)
    out: dict = {"world_size": world, "cases": [], "reference": {}}
    models: dict = {}
    for case in cases:
        name = case["model"]
        config = load_hf_config(name)
        overrides = case.get("config") or {}
        for k, v in overrides.items():
            setattr(config, k, v)
        adapter = get_adapter(FAMILIES[config.model_type])
        task = adapter.check_task(case.get("task"))
        seq_len = case.get("seq_len") or (PRESETS[name].seq_len if name in PRESETS else None)
        key = f"{name}/{task}" + (f"/{case['seq_len']}" if case.get("seq_len") else "")
        key += f"/{json.dumps(overrides, sort_keys=True)}" if overrides else ""
        if key not in models:
            torch.manual_seed(SEED)
            state = adapter.build_model(config, task).state_dict()      # the one full state dict
            models[key] = state
            if rank == 0 and not overrides:
                out["reference"][key] = reference(adapter, config, task, state, args, seq_len)
        kw = dict(case["plan"])
        plan = make_plan(kw, adapter.num_layers(config), world, args.global_batch)
        res = run_case(adapter, config, task, models[key], plan, args, seq_len)
        record_case(out, {"key": key, "plan": kw, "describe": plan.describe()}, res, f"{key} {kw}")
    finish_launch(out, args.out)


if __name__ == "__main__":
    main()
