"""train.py --export-hf: weights trained under TP x PP come back as a plain HF checkpoint folder.

Each launch trains 3 steps and exports; the folder is loaded with transformers' Auto classes and its
weights are compared with a single-process HF model trained the same 3 steps (same initial weights,
same global batches, torch AdamW with DeepSpeed's hyper-parameters, clipping at 1.0). bert-test has
an odd vocabulary (1003), so TP=2 also checks that the vocabulary padding is cut off again; Swin and T5
at TP=2 check the head-sharded relative position bias tables (gathered over their layer's group).
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.dist_launcher import REPO, run_ranks, train_hf_reference

# Adam's first updates are ~lr per element whatever the gradient's size, so an element whose gradient
# is near round-off (summed in another order under TP) can differ by up to ~lr between layouts: lr 1e-4
# keeps that below the 1e-5 tolerance while 3 steps still move every weight matrix by ~3e-4 (checked), so a
# stage or shard that was not gathered, or gathered in the wrong order, fails.
STEPS, LR, SEED, GLOBAL_BATCH = 3, 1e-4, 1234, 8


def _reference(model_name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from model_zoo.registry import FAMILIES, PRESETS, load_hf_config
    from model_zoo.runtime import get_adapter

    config = load_hf_config(model_name)
    adapter = get_adapter(FAMILIES[config.model_type])
    task = adapter.check_task(None)
    torch.manual_seed(SEED)
    model = adapter.build_model(config, task)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    seq_len = PRESETS[model_name].seq_len
    train_hf_reference(adapter, model, (adapter.synthetic_batch(config, task, GLOBAL_BATCH, SEED, step, seq_len=seq_len)
                                        for step in range(STEPS)), LR)
    return init, model.state_dict()


def _load_export(path, model_name: str):
    from transformers import AutoModelForImageClassification, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    auto = {"bert": AutoModelForMaskedLM, "t5": AutoModelForSeq2SeqLM}.get(model_name.split("-")[0],
                                                                          AutoModelForImageClassification)
    return auto.from_pretrained(str(path))


@pytest.mark.distributed
@pytest.mark.parametrize("model_name,world,pp,tp", [
    ("bert-test", 4, 2, 2),
    ("vit-test", 4, 2, 2),
    ("bert-test", 2, 1, 2),
    ("swin-test", 2, 1, 2),
    ("t5-test", 2, 1, 2),
])
def test_export_matches_single_process_training(tmp_path, model_name, world, pp, tp):
    out = tmp_path / "hf"
    metrics = tmp_path / "m.jsonl"
    run_ranks(REPO / "train.py", world,
              ["--model", model_name, "--pp", str(pp), "--tp", str(tp), "--chunks", "2", "--steps", str(STEPS),
               "--lr", str(LR), "--seed", str(SEED), "--global-batch-size", str(GLOBAL_BATCH),
               "--metrics-file", str(metrics), "--export-hf", str(out)], timeout=300)
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".hf.tmp-*"))
    exported = _load_export(out, model_name).state_dict()
    init, ref = _reference(model_name)
    assert set(exported) == set(ref)
    for k, v in ref.items():
        assert exported[k].shape == v.shape, k
        if v.dim() > 1:             # (a bias such as attention's key bias gets no gradient at all)
            assert (v - init[k]).abs().max() > 1e-4, f"{k}: the reference did not move it"
        torch.testing.assert_close(exported[k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    losses = [json.loads(x)["loss"] for x in metrics.read_text().splitlines()[:STEPS]]
    assert len(set(round(x, 6) for x in losses)) == STEPS, "the run did not train"
