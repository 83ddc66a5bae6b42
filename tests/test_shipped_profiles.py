"""The H100 and H200 presets ship model profiles: the search uses them by default (`--model-profile auto`), the plan
records which, and train.py's memory check predicts with the same file."""
import argparse
import json
import os

import pytest

import train
from autotune import memory_check
from autotune.plan import Plan
from autotune.search import main

FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "profiles", "h100", "bert-large.json")
REAL_CHECK = memory_check.check_plan_memory
BASE = ["--model", "bert-large", "--hardware", "1xH100", "--gpu-memory-gb", "40", "--global-batch-size", "32",
        "--quiet"]


def search(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    assert main([*BASE, *extra, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_auto_is_the_shipped_file_and_none_is_analytic(tmp_path):
    auto = search(tmp_path, "auto")
    given = search(tmp_path, "given", "--model-profile", FILE)
    none = search(tmp_path, "none", "--model-profile", "none")
    assert auto["search"]["model_profile"] == "profiles/h100/bert-large.json"
    assert "shipped with 1xH100" in auto["search"]["inputs"]["layer times"]
    # the default is exactly the explicit file: same plan, same predictions
    assert auto["predicted"] == given["predicted"] and auto["tp_sizes_enc"] == given["tp_sizes_enc"]
    assert none["search"]["model_profile"] is None and none["search"]["inputs"]["layer times"].startswith("analytic")
    assert none["predicted"]["step_time_s"] != auto["predicted"]["step_time_s"]


@pytest.mark.parametrize("extra,expected,why", [
    (["--precision", "fp32"], "profiles/h100/fp32/bert-large.json", None),
    (["--seq-len", "128"], None, "sequence length 512"),
    (["--task", "text-classification"], None, "task mlm"),
    (["--hardware", "8xA100-80G", "--gpus", "1"], None, None),
    (["--hardware", "1xH200"], "profiles/h200/bert-large.json", None),
    (["--hardware", "1xH200", "--precision", "fp32"], None, None),   # no fp32 profiles measured on the H200
])
def test_auto_only_where_the_shipped_profile_matches(tmp_path, extra, expected, why):
    plan = search(tmp_path, "p", *extra)
    assert plan["search"]["model_profile"] == expected
    times = plan["search"]["inputs"]["layer times"]
    assert times.startswith("measured") if expected else times.startswith("analytic")
    if why:
        assert why in times


def _check(monkeypatch, plan: Plan, model_profile=None) -> list[float]:
    """train.py's memory check on CPU with a 40 GB budget; the stage peaks it predicted."""
    seen = []

    def spy(*a, **k):
        verdict = REAL_CHECK(*a, **k)
        seen.append(verdict.stage_peak_mb)
        return verdict

    monkeypatch.setattr(memory_check, "check_plan_memory", spy)
    args = argparse.Namespace(force=False, gpu_memory_gb=40.0, model_profile=model_profile)
    train.check_memory(args, plan, train.resolve_model("bert-large", None, None), on_gpu=False)
    return seen[0]


def test_train_memory_check_predicts_with_the_plans_profile(tmp_path, capsys, monkeypatch):
    from autotune.hardware import load_hardware
    from autotune.model_profile import ModelProfile
    from autotune.search import Searcher
    from model_zoo import get_model_spec

    search(tmp_path, "a")
    search(tmp_path, "n", "--model-profile", "none")
    auto, analytic = Plan.load(str(tmp_path / "a.json")), Plan.load(str(tmp_path / "n.json"))
    # the search's own prediction is the independent reference: same file, same peaks
    assert _check(monkeypatch, auto) == pytest.approx(auto.predicted["stage_peak_memory_mb"], abs=0.1)
    assert _check(monkeypatch, analytic) == pytest.approx(analytic.predicted["stage_peak_memory_mb"], abs=0.1)
    # a recorded profile that is not on this machine: analytic, and train.py says so
    auto.search["model_profile"] = "profiles/h100/no-such-model.json"
    plain = [m["total_mb"] for m in Searcher(get_model_spec("bert-large"), load_hardware("1xH100"), 40)
             .predict(auto).stage_memory]
    assert plain != pytest.approx(auto.predicted["stage_peak_memory_mb"], abs=1.0)   # the two models differ here
    assert _check(monkeypatch, auto) == pytest.approx(plain, abs=0.1)
    assert "not here" in capsys.readouterr().err
    # an explicit --model-profile wins over the recorded one (none here): the analytic plan priced with the file
    profile = ModelProfile.load(FILE)
    expected = Searcher(get_model_spec("bert-large"), load_hardware("1xH100"), 40, profile=profile).predict(analytic)
    assert _check(monkeypatch, analytic, FILE) == pytest.approx(
        [m["total_mb"] for m in expected.stage_memory], abs=0.1)
