"""train.py end to end: one process, a plan file on 2 ranks, and the exit-2 errors for bad input."""
from __future__ import annotations

import json

import pytest

from autotune.plan import Plan
from tests.dist_launcher import REPO, main_exit, read_metrics, run_ranks, train_py


def test_single_process_writes_metrics(tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = train_py("--model", "bert-test", "--steps", "3", "--lr", "1e-3", "--metrics-file", str(metrics),
                 "--save-dir", str(tmp_path / "ckpt"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps, _, summary = read_metrics(metrics)
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert s["loss"] > 0 and s["grad_norm"] > 0 and s["step_time_s"] > 0 and s["peak_memory_mb"] > 0
        assert s["samples_per_s"] > 0 and s["tflops_per_gpu"] > 0
        # on CPU the step's work runs as it is queued: the host time is all of the step but the loss read-back
        assert 0.9 * s["step_time_s"] <= s["host_s"] <= s["step_time_s"]
        assert 0 < s["host_cpu_s"]
        # the last backward is queued (and, on CPU, done) before the optimizer step
        assert 0 < s["device_backward_s"] <= s["host_backward_s"] < s["host_s"]
    assert summary["summary"] and summary["measured"]["stage_peak_memory_mb"]
    assert summary["measured"]["host_s"] <= summary["measured"]["step_time_s"]
    assert (tmp_path / "ckpt" / "ds_config.json").is_file() and (tmp_path / "ckpt" / "step3").is_dir()


@pytest.mark.distributed
def test_plan_file_on_two_ranks(tmp_path):
    """A Galvatron-style plan (pp 2, per-layer checkpointing, a predicted block) run by train.py."""
    plan = Plan.uniform(num_layers=4, world_size=2, pp=2, chunks=2, global_bsz=8, checkpoint=[1, 0, 0, 1],
                        precision="bf16", model={"name": "vit-test"})
    plan.predicted = {"step_time_s": 0.5, "samples_per_s": 16.0, "stage_peak_memory_mb": [100.0, 120.0]}
    plan_path = tmp_path / "plan.json"
    plan.save(str(plan_path))
    metrics = tmp_path / "m.jsonl"
    out = run_ranks(REPO / "train.py", 2, ["--model", "vit-test", "--galvatron-plan", str(plan_path), "--steps", "2",
                                           "--metrics-file", str(metrics)], timeout=300)
    steps, _, summary = read_metrics(metrics)
    assert [s["step"] for s in steps] == [0, 1] and all(s["loss"] > 0 for s in steps)
    assert summary["predicted"]["stage_peak_memory_mb"] == [100.0, 120.0]
    assert len(summary["measured"]["stage_peak_memory_mb"]) == 2
    assert "predicted" in out[0]                     # the side-by-side table on rank 0's stdout
    ds_cfg = json.loads((tmp_path / "plan.ds_config.json").read_text())
    assert ds_cfg["gradient_accumulation_steps"] == 2 and ds_cfg["bf16"]["enabled"] is False   # CPU runs fp32


@pytest.mark.parametrize("args,needle", [
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "bert-test", "--galvatron-plan", "/nonexistent/plan.json"], "does not exist"),
    (["--model", "bert-test", "--task", "seq2seq"], "not supported"),
    (["--model", "bert-test", "--pp", "2"], "processes"),
    (["--model", "bert-test", "--data", "/nonexistent/data.jsonl"], "save_to_disk folder"),
])
def test_bad_input_exits_2(args, needle, capsys):
    code, errors = main_exit(capsys, *args)
    assert code == 2 and len(errors) == 1 and needle in errors[0], errors


def test_plan_for_other_world_size_exits_2(tmp_path, capsys):
    plan = Plan.uniform(num_layers=4, world_size=4, tp=2, global_bsz=8, precision="fp32")
    path = tmp_path / "plan.json"
    plan.save(str(path))
    code, errors = main_exit(capsys, "--model", "bert-test", "--galvatron-plan", str(path))
    assert code == 2 and len(errors) == 1
    assert "world_size=4" in errors[0] and "launch 4 processes" in errors[0]


def test_bad_input_exits_2_in_a_process():
    """The same through the command line: exit status 2 and one line on stderr."""
    r = train_py("--model", "no-such-model", timeout=120)
    assert r.returncode == 2
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")][0].startswith("error: unknown model")


def test_file_data(tmp_path, capsys):
    """--data with a JSON-lines file of token ids (BERT) and a save_to_disk folder of PIL images (ViT)."""
    import datasets
    import numpy as np
    from PIL import Image

    text = tmp_path / "tokens.jsonl"
    rng = np.random.default_rng(0)
    text.write_text("".join(json.dumps({"input_ids": rng.integers(5, 1000, rng.integers(5, 30)).tolist(),
                                        "label": int(i % 2)}) + "\n" for i in range(20)))
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(12)]
    datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(12)]}).save_to_disk(tmp_path / "img")
    for model, task, data in (("bert-test", "text-classification", text),
                              ("vit-test", "image-classification", tmp_path / "img")):
        metrics = tmp_path / f"{model}-{task}.jsonl"
        r = train_py("--model", model, "--task", task, "--data", str(data), "--steps", "3", "--metrics-file",
                     str(metrics))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        steps, _, _ = read_metrics(metrics)
        assert len(steps) == 3 and all(s["loss"] > 0 for s in steps)
    code, errors = main_exit(capsys, "--model", "vit-test", "--data", str(text))   # token ids are not images
    assert code == 2 and "pixel_values" in errors[0]


def test_compiled_layers_train_like_eager(tmp_path):
    """--compile (torch.compile per Transformer layer) changes speed, not the losses; so does the CUDA-graph
    mode with a checkpointed layer (left eager; on CPU inductor captures no graphs, so this checks the
    plumbing and the mixed compiled/eager sequence)."""
    plan = tmp_path / "plan.json"
    Plan.uniform(num_layers=4, world_size=1, checkpoint=[1, 0, 1, 0], precision="fp32").save(str(plan))
    losses = {}
    for flag in ((), ("--compile",), ("--compile", "reduce-overhead", "--galvatron-plan", str(plan))):
        metrics = tmp_path / f"m{len(flag)}.jsonl"
        r = train_py("--model", "bert-test", "--steps", "3", "--lr", "1e-3", "--metrics-file", str(metrics), *flag,
                     "--global-batch-size", "8", timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        losses[len(flag)] = [s["loss"] for s in read_metrics(metrics)[0]]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert losses[4] == pytest.approx(losses[0], rel=1e-4)
