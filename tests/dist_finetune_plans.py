"""Fine-tune an HF checkpoint folder on a local dataset under several plans in one launch, next to
single-process HF fine-tuning from the same checkpoint.

For each plan the Megatron groups, the model (from the same full state dict: the checkpoint's weights
and a seeded new head) and a DeepSpeed engine are rebuilt and trained `--steps` steps on the file's
batches (train.py's FileData: the same global batch at step k in every layout); rank 0 also trains the
plain HF model with torch AdamW (DeepSpeed's hyper-parameters, clipping at 1.0) on the same batches.
A case with "export": true then exports the sharded weights to an HF folder, loads it with
transformers' AutoModelForSequenceClassification and records the largest logit difference to the
sharded model on the next batch. Usage (under tests/dist_launcher.run_ranks):

    python tests/dist_finetune_plans.py --model DIR --data train.csv --cases '[{"plan": {"tp": 2}}]' --out r.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from autotune.plan import Plan  # noqa: E402
from backends.data import FileData, load_records  # noqa: E402
from backends.deepspeed.engine import build_engine  # noqa: E402
from backends.export import capture_layout  # noqa: E402
from backends.megatron.groups import build_parallel_groups, destroy_parallel_groups, init_distributed  # noqa: E402
from backends.megatron.random import seed_everything  # noqa: E402
from model_zoo.runtime import get_adapter  # noqa: E402
from tests.dist_launcher import finish_launch, record_case, train_hf_reference  # noqa: E402
from train import export_hf, initial_state_dict, make_tokenizer, resolve_model  # noqa: E402

SEED = 1234


def hf_fine_tuning(adapter, choice, state: dict, data: FileData, args) -> list[float]:
    """Losses of the plain HF model fine-tuned in one process on the same global batches."""
    model = adapter.build_model(choice.config, choice.task, state)
    return train_hf_reference(adapter, model, (data.global_batch(step) for step in range(args.steps)), args.lr)[0]


def export_logit_diff(trainer, layout, adapter, choice, data: FileData, step: int) -> float | None:
    """Collective: the largest difference between the HF export's logits (loaded by plain transformers)
    and the sharded model's on the global batch of `step`; on rank 0, None elsewhere."""
    from transformers import AutoModelForSequenceClassification

    captured: list[torch.Tensor] = []

    def capture(output, labels):
        captured.append(output.detach().float().cpu())
        return torch.zeros(1)

    trainer.eval_step(data.micro_batches(step), capture)
    groups = trainer.groups
    mine = (groups.dp_rank, torch.cat(captured)) if captured and groups.tp_rank == 0 else None
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    rank = dist.get_rank()
    with tempfile.TemporaryDirectory() as tmp:           # train.py's export: only rank 0 writes (into its folder)
        export_hf(trainer, layout, adapter, choice, str(Path(tmp) / "hf"), rank, log=lambda *_: None)
        if rank != 0:
            return None
        sharded = torch.cat([t for _, t in sorted((p for p in parts if p is not None), key=lambda p: p[0])])
        loaded = AutoModelForSequenceClassification.from_pretrained(str(Path(tmp) / "hf")).eval()
        batch = data.global_batch(step)
        with torch.no_grad():
            logits = loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return float((logits - sharded).abs().max())


def run_case(adapter, choice, state: dict, dataset, tokenize, plan: Plan, args, export: bool) -> dict:
    groups = build_parallel_groups(plan)
    seed_everything(SEED, groups.tp_rank, groups.pp_rank)
    model = adapter.build_model(choice.config, choice.task, state)
    adapter.tensor_parallelize(model, choice.task, groups.tp_groups)
    layout = capture_layout(model, groups.tp_groups.vocab) if export else None
    trainer = build_engine(plan, groups, adapter.layer_sequence(model, choice.task), lr=args.lr)
    data = FileData(adapter, choice.config, choice.task, plan, groups.dp_rank, SEED, dataset,
                    seq_len=choice.seq_len, tokenize=tokenize)
    out = {"loss": [trainer.train_step(data.micro_batches(step)).loss for step in range(args.steps)]}
    if export:
        out["export_max_logit_diff"] = export_logit_diff(trainer, layout, adapter, choice, data, args.steps)
    trainer.destroy()
    destroy_parallel_groups()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="HF checkpoint folder (weights and tokenizer)")
    p.add_argument("--task", default="text-classification")
    p.add_argument("--data", required=True, help="dataset file with text and label columns")
    p.add_argument("--cases", required=True, help='JSON list of {"plan": Plan.uniform kwargs, "export": bool}')
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args()
    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    choice = resolve_model(args.model, args.task, args.seq_len)
    adapter = get_adapter(choice.family)
    adapter.set_dropout(choice.config, args.dropout)
    state = initial_state_dict(adapter, choice, SEED)
    dataset, tokenize = load_records(args.data), make_tokenizer(adapter, choice)
    out: dict = {"world_size": world, "cases": []}
    for case in json.loads(args.cases):
        plan = Plan.uniform(num_layers=adapter.num_layers(choice.config), world_size=world,
                            global_bsz=args.global_batch, precision="fp32", **case["plan"])
        if rank == 0 and "reference" not in out:
            data = FileData(adapter, choice.config, choice.task, plan, 0, SEED, dataset, seq_len=choice.seq_len,
                            tokenize=tokenize)
            out["reference"] = hf_fine_tuning(adapter, choice, state, data, args)
        res = run_case(adapter, choice, state, dataset, tokenize, plan, args, bool(case.get("export")))
        record_case(out, {"plan": case["plan"], "describe": plan.describe()}, res, plan.describe())
    finish_launch(out, args.out)


if __name__ == "__main__":
    main()
