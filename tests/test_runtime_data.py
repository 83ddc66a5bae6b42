"""Deterministic data: every layout sees the same global batch; DP ranks split it exactly."""
from __future__ import annotations

import json

import torch

from autotune.plan import Plan
from backends.data import FileData, SyntheticData, dp_slice, load_records, split_micro
from model_zoo.registry import load_hf_config
from model_zoo.runtime import get_adapter


def _concat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _plan(world: int, chunks: int) -> Plan:
    return Plan.uniform(num_layers=4, world_size=world, chunks=chunks, global_bsz=8, precision="fp32")


def test_dp_slices_and_micro_batches_partition_the_global_batch():
    for name, task in (("bert-test", "mlm"), ("vit-test", "image-classification")):
        config = load_hf_config(name)
        adapter = get_adapter(config.model_type)
        plan = _plan(4, 2)
        data = [SyntheticData(adapter, config, task, plan, r, seed=3, seq_len=16) for r in range(plan.dp_deg)]
        glob = data[0].global_batch(5)
        pieces = [mb for d in data for mb in split_micro(dp_slice(d.global_batch(5), d.dp_rank, plan.dp_deg), 2)]
        for k, v in _concat(pieces).items():
            assert torch.equal(v, glob[k])
        again = SyntheticData(adapter, config, task, _plan(1, 1), 0, seed=3, seq_len=16).global_batch(5)
        assert all(torch.equal(again[k], glob[k]) for k in glob)            # independent of the layout
        other = data[0].global_batch(6)
        assert not torch.equal(other["labels"], glob["labels"])


def test_synthetic_mlm_labels_the_same_count_in_every_sample():
    config = load_hf_config("bert-test")
    batch = get_adapter("bert").synthetic_batch(config, "mlm", 8, seed=1, step=0, seq_len=32)
    counts = (batch["labels"] != -100).sum(dim=1)
    assert counts.min() == counts.max() == round(0.15 * 32)
    assert (batch["input_ids"][batch["labels"] != -100] == 103).all()


def test_file_data_order_is_seeded_and_covers_each_epoch(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"input_ids": [10 + i] * 3, "label": i % 2}) + "\n" for i in range(12)))
    config = load_hf_config("bert-test")
    adapter = get_adapter("bert")
    plan = Plan.uniform(num_layers=4, world_size=2, global_bsz=4, precision="fp32")
    ds = load_records(str(path))
    a = FileData(adapter, config, "text-classification", plan, 0, seed=5, dataset=ds, seq_len=8)
    b = FileData(adapter, config, "text-classification", plan, 1, seed=5, dataset=ds, seq_len=8)
    firsts = [a.global_batch(s)["input_ids"][:, 0] for s in range(6)]
    assert torch.equal(torch.cat(firsts), torch.cat([b.global_batch(s)["input_ids"][:, 0] for s in range(6)]))
    epoch0, epoch1 = torch.cat(firsts[:3]), torch.cat(firsts[3:])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(10, 22))
    assert not torch.equal(epoch0, epoch1)                                   # reshuffled each epoch
    batch = a.global_batch(0)
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 3, 3, 3]       # padded to seq_len 8


def test_collate_mlm_masks_real_tokens_only():
    config = load_hf_config("bert-test")
    records = [{"input_ids": list(range(200, 200 + n))} for n in (5, 20, 32)]
    batch = get_adapter("bert").collate(config, "mlm", records, seed=1, step=0, seq_len=24)
    labelled = batch["labels"] != -100
    assert labelled.sum(dim=1).tolist() == [round(0.15 * 5) or 1, 3, round(0.15 * 24)]
    assert not (labelled & (batch["attention_mask"] == 0)).any()
    assert batch["input_ids"].shape == (3, 24)
