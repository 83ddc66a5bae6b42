"""`python autotune/search.py`: default run, outputs, and bad input (exit 2, one line, nothing written)."""
import json
import os
import subprocess
import sys

import pytest

from autotune.search import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "autotune", "search.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_default_run_writes_plan_and_ds_config(tmp_path):
    r = run_cli(["--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    ds = json.loads((tmp_path / "ds_config.json").read_text())
    assert plan["model"]["name"] == "bert-large" and plan["world_size"] == 8
    assert plan["cluster"]["hardware"] == "8xH100"
    for key in ("pp_deg", "tp_sizes_enc", "tp_consecutive_flags", "dp_types_enc", "checkpoint", "global_bsz",
                "chunks", "pp_division", "pipeline_type", "default_dp_type", "vtp", "zero_stage",
                "micro_batch_size", "precision", "schema_version"):
        assert key in plan, key
    assert len(plan["tp_sizes_enc"].split(",")) == 24
    pred = plan["predicted"]
    assert pred["samples_per_s"] > 0 and pred["step_time_s"] > 0
    assert len(pred["stage_peak_memory_mb"]) == plan["pp_deg"] == len(pred["stage_memory_breakdown_mb"])
    assert plan["search"]["seconds"] > 0
    assert ds["train_batch_size"] == plan["global_bsz"]
    assert ds["zero_optimization"]["stage"] == plan["zero_stage"]
    for line in ("Best plan of each restricted space", "Next-best alternatives", "stage 0 mem"):
        assert line in r.stdout


@pytest.mark.parametrize("model", ["bert-test", "t5-test", "vit-test", "swin-test", "t5-large", "swin-base"])
def test_presets_plan(tmp_path, model, capsys):
    out = tmp_path / "p.json"
    assert main(["--model", model, "--gpus", "4", "--gpu-memory-gb", "16", "--global-batch-size", "32",
                 "--out", str(out), "--quiet"]) == 0
    plan = json.loads(out.read_text())
    assert plan["global_bsz"] == 32 and plan["world_size"] == 4
    assert max(plan["predicted"]["stage_peak_memory_mb"]) <= 16 * 1024


def test_json_output(tmp_path, capsys):
    assert main(["--model", "bert-base", "--gpus", "2", "--json", "--out", str(tmp_path / "p.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "p.json").read_text())


@pytest.mark.parametrize("space", ["dp", "zero3", "tp", "pp", "3d", "deepspeed"])
def test_restricted_spaces(tmp_path, space, capsys):
    assert main(["--model", "bert-large", "--gpus", "8", "--gpu-memory-gb", "80", "--global-batch-size", "64",
                 "--space", space, "--out", str(tmp_path / "p.json"), "--quiet"]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    tp, pp = int(plan["tp_sizes_enc"].split(",")[0]), plan["pp_deg"]
    # dp = 1 (tp, pp spaces): bf16 plans use the stage-1 engine, which has nothing to shard there
    expected = {"dp": (1, 1, 0), "zero3": (1, 1, 3), "tp": (8, 1, 1), "pp": (1, 8, 1), "3d": (2, 2, None),
                "deepspeed": (1, 1, None)}[space]
    assert (tp, pp) == expected[:2]
    if expected[2] is not None:
        assert plan["zero_stage"] == expected[2]
    if space == "deepspeed":
        assert "1" not in plan["checkpoint"]


@pytest.mark.parametrize("args,needle", [
    (["--model", "no-such-model"], "unknown model"),
    (["--gpus", "12", "--nodes", "5"], "not divisible"),
    (["--gpu-memory-gb", "0.5"], "fits"),
    (["--hardware", "no-such-hw"], "unknown hardware"),
    (["--global-batch-size", "0"], "must be positive"),
])
def test_bad_input(tmp_path, args, needle, capsys):
    out = tmp_path / "plan.json"
    assert main(args + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_bad_files(tmp_path, capsys):
    bad = tmp_path / "hw.json"
    bad.write_text('{"name": "x"}')
    assert main(["--hardware", str(bad), "--out", str(tmp_path / "o" / "p.json")]) == 2
    assert "lacks key" in capsys.readouterr().err
    bad.write_text("{oops")
    assert main(["--hardware", str(bad), "--out", str(tmp_path / "o" / "p.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_exit_code_2_from_script(tmp_path):
    r = run_cli(["--model", "nope"], tmp_path)
    assert r.returncode == 2 and "unknown model" in r.stderr and not os.listdir(tmp_path)


@pytest.mark.parametrize("model, bound", [("bert-large", "GPU"), ("swin-base", "host")])
def test_plan_says_what_bounds_its_step(tmp_path, model, bound):
    """With the H200 profiles, BERT-large's one-GPU plan (batch 64, ZeRO-1: 54 ms of launches against 182 ms of
    GPU work) is GPU-bound and Swin-B's (batch 64, ZeRO-1: 88 against 50 ms) launch-bound; the plan records it per
    stage, as the breakdown's two sums say, and the report warns about the launch-bound one."""
    r = run_cli(["--model", model, "--hardware", "1xH200", "--model-profile",
                 os.path.join(ROOT, "profiles", "h200", f"{model}.json"), "--out", str(tmp_path / "plan.json")], tmp_path)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["predicted"]["stage_bound"] == [bound]
    parts = plan["predicted"]["stage_time_breakdown_s"][0]
    assert (parts["compute_host"] > parts["compute_gpu"]) == (bound == "host")
    assert ("follows the CPU's speed" in r.stdout) == (bound == "host")
