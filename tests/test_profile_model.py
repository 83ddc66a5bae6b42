"""Model profiler on CPU for the tiny presets: the files load with ModelProfile and the accessors the cost
model calls return sane numbers; plus the profile file's validation and fits."""
from __future__ import annotations

import json
import math
import os

import pytest

from autotune import profile_model
from autotune.model_profile import SCHEMA_VERSION, ModelProfile, ProfileError, TimeFit, fit_time
from model_zoo.registry import get_model_spec

PRESETS = ("bert-test", "t5-test", "vit-test", "swin-test")
FAST = ["--device", "cpu", "--precision", "fp32", "--batch-sizes", "1,2,4", "--reps", "1", "--warmup", "0",
        "--tp", "1,2"]


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profiles")
    out = {}
    for name in PRESETS:
        path = folder / f"{name}.json"
        assert profile_model.main(["--model", name, *FAST, "--out", str(path)]) == 0
        out[name] = str(path)
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_profile_loads_and_accessors_are_sane(profiles, name):
    p = ModelProfile.load(profiles[name])
    spec = get_model_spec(name, "fp32", None, None, device="cpu")
    assert (p.model, p.precision, p.device_type, p.family) == (name, "fp32", "cpu", spec.family)
    assert p.seq_len == spec.seq_lens[0] and math.isfinite(p.fit_error) and p.fit_error >= 0
    assert p.source["command"].startswith("python autotune/profile_model.py") and p.source["date"]
    for lt in spec.layer_types:
        assert p.params(lt.name) == lt.params                     # exact count of the HF module
        for b in (1, 3, 8):
            f, bw = p.layer_time_ms(lt.name, 1, b, "fwd"), p.layer_time_ms(lt.name, 1, b, "bwd")
            assert f > 0 and bw > 0
            assert p.layer_time_ms(lt.name, 1, b, "recompute") >= 0
        assert p.layer_time_ms(lt.name, 1, 16, "fwd") >= p.layer_time_ms(lt.name, 1, 1, "fwd")
        # measured activations agree with the family's analytic description (same saved-tensor model)
        assert p.act_bytes(lt.name, 1, False) == lt.act_bytes[1]
        assert p.act_bytes(lt.name, 1, True) == lt.ckpt_bytes < lt.act_bytes[1]
    assert p.layer_time_ms("no-such-layer", 1, 4, "fwd") is None
    assert p.layer_time_ms(spec.layer_types[0].name, 64, 4, "fwd") is None
    assert p.layer_time_ms(spec.layer_types[0].name, 1, 4, "sideways") is None
    assert p.act_bytes("no-such-layer", 1, False) is None and p.params("no-such-layer") is None
    for part in ("first", "last"):
        assert p.other_time_ms(part, 1, 4, "fwd") > 0 and p.other_time_ms(part, 1, 4, "bwd") > 0
        assert p.other_act_bytes(part, 1) > 0
    total = spec.other.act_bytes_first[1] + spec.other.act_bytes_last[1]
    measured = p.other_act_bytes("first", 1) + p.other_act_bytes("last", 1)
    assert abs(measured - total) <= 0.01 * total               # T5 differs by the decoder token ids only


def test_tp_shards_where_the_config_expresses_them(profiles):
    """T5 and ViT configs carry the head size, so their TP shard is built and is smaller; a family whose
    config cannot express it is skipped with a note naming the fix, never profiled with a wrong shape."""
    for name in ("t5-test", "vit-test"):
        p = ModelProfile.load(profiles[name])
        for lt in p.layer_types:
            assert p.tp_degrees(lt) == [1, 2]
            assert p.act_bytes(lt, 2, False) < p.act_bytes(lt, 1, False)
            assert p.act_bytes(lt, 2, True) == p.act_bytes(lt, 1, True)   # the layer input is replicated
            assert p.layer_types[lt].tp[2].params < p.layer_types[lt].tp[1].params
    bert = ModelProfile.load(profiles["bert-test"])
    if bert.tp_degrees("bert_enc") == [1]:
        assert any("tp=2 not profiled" in n and "tp_shard_config" in n for n in bert.notes)


def test_text_models_profile_vocab_shards_and_vision_models_ignore_vtp(profiles):
    bert = ModelProfile.load(profiles["bert-test"])
    assert bert.vocab_size > 0 and bert.other_act_bytes("last", 2) < bert.other_act_bytes("last", 1)
    assert bert.other_time_ms("last", 8, 4, "fwd") is None           # vtp=8 was not profiled
    vit = ModelProfile.load(profiles["vit-test"])
    assert vit.vocab_size == 0 and vit.other_act_bytes("first", 4) == vit.other_act_bytes("first", 1)


def test_refit_and_save_round_trip(profiles, tmp_path):
    out = tmp_path / "refit.json"
    assert profile_model.main(["--refit", profiles["vit-test"], "--out", str(out)]) == 0
    a, b = ModelProfile.load(profiles["vit-test"]), ModelProfile.load(str(out))
    assert a.to_dict()["layer_types"].keys() == b.to_dict()["layer_types"].keys()
    assert b.layer_time_ms("vit_enc", 1, 4, "fwd") == pytest.approx(a.layer_time_ms("vit_enc", 1, 4, "fwd"))
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []   # atomic write leaves nothing


@pytest.mark.parametrize("content, words", [
    ("{not json", "not valid JSON"),
    (json.dumps({"schema": "something-else"}), "is not a model profile"),
    (json.dumps({"schema": "galvatron-ds/model-profile", "schema_version": SCHEMA_VERSION + 1}), "schema_version"),
    (json.dumps({"schema": "galvatron-ds/model-profile", "schema_version": SCHEMA_VERSION, "model": "m",
                 "precision": "bf16", "device": "cpu", "layer_types": {"x": {"tp": {"zero": {}}}}}), "TP degree"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, words):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ProfileError) as e:
        ModelProfile.load(str(path))
    assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ProfileError, match="does not exist"):
        ModelProfile.load(str(tmp_path / "missing.json"))


def test_bad_cli_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "p.json"
    for argv in (["--model", "no-such-model"], ["--model", "bert-test", "--batch-sizes", "0,2"],
                 ["--model", "bert-test", "--seq-len", "100000", "--device", "cpu"],
                 ["--model", "bert-test", "--task", "seq2seq", "--device", "cpu"]):
        assert profile_model.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("profile_model: error:") and "\n" not in err
    assert not out.exists()


def test_fit_time_forms():
    line = fit_time([1, 2, 4, 8], [0.3 + 0.2 * b for b in (1, 2, 4, 8)])
    assert (line.c, line.m, line.floor) == (pytest.approx(0.3), pytest.approx(0.2), 0.0) and line.max_rel_err < 1e-9
    launch_bound = fit_time([1, 2, 4, 8, 16, 32], [0.1, 0.1, 0.1, 0.16, 0.32, 0.64])
    assert launch_bound.floor == pytest.approx(0.1) and launch_bound.median_rel_err < 1e-9
    assert launch_bound(1) == pytest.approx(0.1) and launch_bound(64) == pytest.approx(1.28)
    assert TimeFit.from_dict(line.to_dict()) == line
