"""Model profiler on CPU for the tiny presets: the files load with ModelProfile and the accessors the cost
model calls return sane numbers; plus the profile file's validation and fits."""
from __future__ import annotations

import gc
import json
import statistics
import math
import os

import pytest
import torch

from autotune import profile_model
from autotune.model_profile import SCHEMA_VERSION, ModelProfile, ProfileError, TimeFit, fit_split, fit_time
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
                 ["--model", "bert-test", "--task", "seq2seq", "--device", "cpu"],
                 ["--model", "bert-test", "--device", "cpu", "--other-reps", "0"]):
        assert profile_model.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("profile_model: error:") and "\n" not in err
    assert "--other-reps 0 must be >= 1" in err
    assert not out.exists()


def test_fit_time_forms():
    line = fit_time([1, 2, 4, 8], [0.3 + 0.2 * b for b in (1, 2, 4, 8)])
    assert (line.c, line.m, line.floor) == (pytest.approx(0.3), pytest.approx(0.2), 0.0) and line.max_rel_err < 1e-9
    launch_bound = fit_time([1, 2, 4, 8, 16, 32], [0.1, 0.1, 0.1, 0.16, 0.32, 0.64])
    assert launch_bound.floor == pytest.approx(0.1) and launch_bound.median_rel_err < 1e-9
    assert launch_bound(1) == pytest.approx(0.1) and launch_bound(64) == pytest.approx(1.28)
    assert TimeFit.from_dict(line.to_dict()) == line


# ------------------------------------------------------------------ GPU/CPU split: fit and timing path
BS = [1, 2, 4, 8, 16, 32]
CPU = [1.0, 1.3, 0.9, 1.0, 1.05, 0.95]            # launch time per call: median 1.0, mean 1.033
GPU = [0.1 + 0.05 * b for b in BS]                # 0.15 0.2 0.3 0.5 0.9 1.7: launch-bound up to b=16
TIME = [max(c, g) for c, g in zip(CPU, GPU)]      # 1.0 1.3 0.9 1.0 1.05 1.7


def test_fit_split_recovers_floor_and_slope():
    f = fit_split(BS, TIME, GPU, CPU)
    # floor = median(CPU) = (1.0 + 1.0) / 2; the GPU points at or above floor/2 (b = 8, 16, 32) lie on the line
    assert (f.floor, f.c, f.m) == (pytest.approx(1.0), pytest.approx(0.1), pytest.approx(0.05))
    # errors against TIME: b=2 0.3/1.3, b=4 0.1/0.9, b=16 0.05/1.05, the others 0 -> median (0 + 0.05/1.05) / 2
    assert f.median_rel_err == pytest.approx(0.05 / 1.05 / 2) and f.max_rel_err == pytest.approx(0.3 / 1.3)
    assert f(1) == pytest.approx(1.0) and f(32) == pytest.approx(1.7) and f(64) == pytest.approx(3.3)
    # GPU times of small batches far under the floor (latency-bound kernels, not linear) do not bend the line
    bent = fit_split(BS, TIME, [0.45, 0.45, 0.45] + GPU[3:], CPU)
    assert (bent.c, bent.m) == (pytest.approx(0.1), pytest.approx(0.05))
    # fewer than SPLIT_MIN_POINTS at or above floor/2 (floor 2: only b=32): topped up with the largest b (8, 16)
    top = fit_split(BS, [2.0] * 6, GPU, [2.0] * 6)
    assert (top.floor, top.c, top.m) == (2.0, pytest.approx(0.1), pytest.approx(0.05))
    # ... and GPU points far under the floor (0.01 at b <= 4) are not used for the line
    low = [0.01, 0.01, 0.01] + GPU[3:]
    assert fit_split(BS, [2.0] * 6, low, [2.0] * 6).c == pytest.approx(0.1)
    # a point that could not be split (None) is left out of both parts; < 2 split points: fit_time
    part = fit_split(BS, TIME, [None] + GPU[1:], [None] + CPU[1:])
    assert part.floor == pytest.approx(1.0) and part.m == pytest.approx(0.05)
    assert fit_split(BS, TIME, [None] * 5 + [1.7], [None] * 5 + [0.95]) == fit_time(BS, TIME)


def test_fit_split_two_level_floor_where_the_launches_change_at_a_size():
    # CPU launch time 0.4 ms up to b=4, then 0.8 ms (as CUDA's embedding backward above 3072 indices): the
    # floor takes two levels, the step at the geometric middle of b=4 and b=8; the GPU line stays
    cpu = [0.40, 0.41, 0.39, 0.80, 0.82, 0.78]
    gpu = [0.05 * b for b in BS]                      # 0.05 .. 1.6: visible only at b=32
    t = [max(c, g) for c, g in zip(cpu, gpu)]
    f = fit_split(BS, t, gpu, cpu)
    assert (f.floor, f.step_floor, f.step_b) == (pytest.approx(0.40), pytest.approx(0.80), pytest.approx(32 ** 0.5))
    assert f(4) == pytest.approx(0.40) and f(8) == pytest.approx(0.80) and f(32) == pytest.approx(1.6)
    # errors against t: b=2 0.01/0.41, b=4 0.01/0.39, b=8 0, b=16 0.02/0.82, b=32 0 -> median of 6
    errs = sorted([0, 0.01 / 0.41, 0.01 / 0.39, 0, 0.02 / 0.82, 0])
    assert f.median_rel_err == pytest.approx((errs[2] + errs[3]) / 2)
    # the file keeps the step; an old file (no floor_step) loads as one floor
    assert TimeFit.from_dict(f.to_dict()) == f
    assert TimeFit.from_dict({"c": 0.1, "m": 0.05, "floor": 1.0})(64) == pytest.approx(3.3)
    # scatter is no step: the two groups overlap (0.45 above 0.44), or the jump is under STEP_MIN_JUMP
    for noisy in ([0.40, 0.45, 0.39, 0.44, 0.50, 0.48], [0.40, 0.41, 0.39, 0.46, 0.47, 0.45]):
        g = fit_split(BS, [max(c, x) for c, x in zip(noisy, gpu)], gpu, noisy)
        assert g.step_b == float("inf") and g.floor == pytest.approx(statistics.median(noisy))


def _old_format_profile(with_split: bool) -> dict:
    entry = {"batch_sizes": BS, "time_ms": {"fwd": TIME, "bwd": [0.3 + 0.2 * b for b in BS],
                                          "bwd_ckpt": [0.5 + 0.4 * b for b in BS]},
             "fits": {"fwd": {"c": 9.0, "m": 9.0}, "bwd": {"c": 9.0, "m": 9.0}}, "act_bytes": 10, "ckpt_bytes": 1}
    if with_split:
        entry.update(gpu_ms={"fwd": GPU}, cpu_ms={"fwd": CPU})   # bwd without parts: fit_time
    return {"schema": "galvatron-ds/model-profile", "schema_version": SCHEMA_VERSION, "model": "m",
            "precision": "bf16", "device": "NVIDIA H100", "device_type": "cuda", "batch_sizes": BS,
            "layer_types": {"enc": {"index": 0, "count": 2, "params": 5, "tp": {"1": entry}}}}


@pytest.mark.parametrize("with_split", [False, True])
def test_profiles_with_and_without_gpu_cpu_parts_load_and_refit(tmp_path, with_split):
    path, out = tmp_path / "old.json", tmp_path / "new.json"
    path.write_text(json.dumps(_old_format_profile(with_split)))
    p = ModelProfile.load(str(path))
    assert p.layer_time_ms("enc", 1, 2, "fwd") == pytest.approx(27.0)   # the stored fit 9 + 9*2, as written
    assert profile_model.main(["--refit", str(path), "--out", str(out)]) == 0
    q = ModelProfile.load(str(out))
    fwd, bwd = q.layer_types["enc"].tp[1].fits["fwd"], q.layer_types["enc"].tp[1].fits["bwd"]
    assert (bwd.c, bwd.m, bwd.floor) == (pytest.approx(0.3), pytest.approx(0.2), 0.0)   # a plain line
    if with_split:
        assert (fwd.floor, fwd.c, fwd.m) == (pytest.approx(1.0), pytest.approx(0.1), pytest.approx(0.05))
        assert q.layer_types["enc"].tp[1].raw["gpu_ms"] == {"fwd": GPU}        # kept as is
    else:
        assert fwd == fit_time(BS, TIME) and "gpu_ms" not in q.layer_types["enc"].tp[1].raw
    assert q.fit_error == pytest.approx(profile_model.pooled_fit_error(q))


def test_split_fit_errors_gpu_part_and_cpu_scatter(tmp_path):
    """GPU part: GPU times on a line are fitted exactly (0); CPU part: scatter about the median launch time,
    hand-computed; entries without parts are left out (None when no entry has them)."""
    from autotune.model_profile import split_fit_errors

    path = tmp_path / "p.json"
    path.write_text(json.dumps(_old_format_profile(with_split=True)))
    gpu, cpu = split_fit_errors(ModelProfile.load(str(path)))
    assert gpu == pytest.approx(0.0, abs=1e-12)
    floor = statistics.median(CPU)
    assert cpu == pytest.approx(statistics.median(abs(floor - c) / c for c in CPU))
    path.write_text(json.dumps(_old_format_profile(with_split=False)))
    assert split_fit_errors(ModelProfile.load(str(path))) == (None, None)


def test_fit_errors_pool_layers_and_embeddings_head_apart(tmp_path):
    """fit_errors: the layers' points and the embeddings'/head's points, each pooled on its own and together;
    errors hand-computed against the stored fits (no refit)."""
    from autotune.model_profile import fit_errors

    d = _old_format_profile(with_split=False)
    d["layer_types"]["enc"]["tp"]["1"] = {"batch_sizes": [1, 2], "time_ms": {"fwd": [1.0, 2.0]},
                                          "fits": {"fwd": {"c": 0.0, "m": 1.1}}}          # errors 10 %, 10 %
    d["other"] = {"first": {"vtp": {"1": {"batch_sizes": [1, 2, 4], "time_ms": {"fwd": [1.0, 1.0, 1.0]},
                                          "fits": {"fwd": {"c": 1.2, "m": 0.0}}}}}}        # errors 20 % x3
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    errs = fit_errors(ModelProfile.load(str(path)))
    assert errs["layers"] == pytest.approx(0.1) and errs["other"] == pytest.approx(0.2)
    assert errs["all"] == pytest.approx(0.2)   # median of 0.1, 0.1, 0.2, 0.2, 0.2


class FakeSplitClock(profile_model.Clock):
    """CPU stand-in for the CUDA clock, to run the split-timing path on CPU: marks are wall clock, spins are
    recorded (nothing waits), and the first `fails` checks say the spin had already ended."""

    def __init__(self, device, fails=0, fail_at=()):
        super().__init__(device)
        self.can_split, self.sleeps, self.fails, self.fail_at, self.checks = True, [], fails, set(fail_at), 0
        self.gc_on = []

    def sleep(self, ms):
        if ms > 0:
            self.sleeps.append(ms)
            self.gc_on.append(gc.isenabled())

    def reached(self, mark):
        self.checks += 1
        if self.fails or self.checks in self.fail_at:
            self.fails = max(0, self.fails - 1)
            return True
        return False


def _split_profile(tmp_path, monkeypatch, fails, calls=None):
    clocks = []
    monkeypatch.setattr(profile_model, "make_clock", lambda opts: clocks.append(FakeSplitClock(opts.device, fails))
                        or clocks[-1])
    if calls is not None:
        monkeypatch.setattr(profile_model, "calls_per_timing", lambda single, opts, cap=32: calls)
    out = tmp_path / "split.json"
    assert profile_model.main(["--model", "bert-test", "--device", "cpu", "--precision", "fp32", "--batch-sizes",
                               "1,2,4", "--reps", "2", "--warmup", "1", "--tp", "1", "--skip-other",
                               "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    return d["layer_types"]["bert_enc"]["tp"]["1"], [c for c in clocks if c.sleeps], ModelProfile.load(str(out))


def test_split_timing_stores_both_parts_and_fits_them(tmp_path, monkeypatch):
    e, clocks, p = _split_profile(tmp_path, monkeypatch, fails=1)
    for k in ("fwd", "bwd", "bwd_ckpt"):
        assert len(e["gpu_ms"][k]) == len(e["cpu_ms"][k]) == len(e["time_ms"][k]) == 3
        assert e["time_ms"][k] == [max(g, c) for g, c in zip(e["gpu_ms"][k], e["cpu_ms"][k])]
        f = fit_split(e["batch_sizes"], e["time_ms"][k], e["gpu_ms"][k], e["cpu_ms"][k])
        assert p.layer_types["bert_enc"].tp[1].fits[k] == f
    # the first check failed: that attempt's spins (fwd, bwd) are repeated twice as long
    s = clocks[0].sleeps
    assert s[2] == pytest.approx(2 * s[0]) and s[3] == pytest.approx(2 * s[1])
    assert e["calls_per_timing"] == [1, 1, 1] and "notes" not in e
    # timed as train.py trains: automatic GC off during every timed region, on again afterwards
    assert clocks[0].gc_on and not any(clocks[0].gc_on) and gc.isenabled()


def test_split_timing_halves_the_region_then_gives_up_on_the_split(tmp_path, monkeypatch):
    # 4 failed checks at b=1: spin x2, x4, then 4 -> 2 -> 1 calls, and the 5th attempt holds
    e, _, _ = _split_profile(tmp_path, monkeypatch, fails=4, calls=4)
    assert e["calls_per_timing"] == [1, 4, 4] and all(v is not None for v in e["gpu_ms"]["fwd"])
    # every check fails: no split anywhere, timed as whole regions, fitted as before
    e, _, p = _split_profile(tmp_path, monkeypatch, fails=10**9)
    assert e["gpu_ms"]["fwd"] == [None, None, None] and e["cpu_ms"]["bwd"] == [None, None, None]
    assert sum("could not be split" in n for n in e["notes"]) == 3
    assert p.layer_types["bert_enc"].tp[1].fits["fwd"] == fit_time(e["batch_sizes"], e["time_ms"]["fwd"])


def test_split_repetition_retried_with_longer_spin_then_dropped():
    class Progress:
        def step(self, n=1, what=""):
            pass

    torch.manual_seed(0)
    opts = profile_model.Options(device=torch.device("cpu"), precision="fp32", batch_sizes=[1], tps=[1], warmup=1,
                                 reps=2, other_reps=1, act_batches=(4, 8), check_batch=8, seq_len=None,
                                 do_other=False, layer_types=None)
    # checks 1-3: the settling repetition; 4 (forward of repetition 1) and 5 (its retry) fail
    clock = FakeSplitClock(torch.device("cpu"), fail_at=(4, 5))
    done, results, notes = profile_model.time_layer_split(
        torch.nn.Linear(8, 8), lambda b: (torch.randn(b, 8, requires_grad=True),), opts, clock, Progress(), "lin")
    s = clock.sleeps[3:]   # fwd, bwd of the failed try; both x2 (retry); repetition 2 at x2: fwd, bwd, bwd_ckpt
    assert len(s) == 7 and s[2:4] == pytest.approx([2 * s[0], 2 * s[1]]) and s[4:6] == pytest.approx(s[2:4])
    assert done == [1] and results[0]["calls_per_timing"] == 1 and results[0]["gpu"]["fwd"] > 0
    assert any("repetitions dropped" in n and "{1: 1}" in n for n in notes)



class LoggingSplitClock(FakeSplitClock):
    """FakeSplitClock that also logs synchronisations and spins in order, and fails the checks numbered in
    `fail_at` (every check, layers' and task model's, counts)."""

    def __init__(self, device, fail_at=()):
        super().__init__(device, fail_at=fail_at)
        self.log = []

    def sync(self):
        self.log.append("sync")

    def sleep(self, ms):
        super().sleep(ms)
        if ms > 0:
            self.log.append(float(ms))


def _other_split_profile(tmp_path, monkeypatch, model, fail_at=()):
    clocks = []
    monkeypatch.setattr(profile_model, "make_clock",
                        lambda opts: clocks.append(LoggingSplitClock(opts.device, fail_at)) or clocks[-1])
    out = tmp_path / f"{model}.json"
    assert profile_model.main(["--model", model, "--device", "cpu", "--precision", "fp32", "--batch-sizes", "1,2",
                               "--reps", "2", "--warmup", "2", "--tp", "1", "--out", str(out)]) == 0
    return json.loads(out.read_text()), clocks[-2]   # the task model's (vtp 1); the last one is source_info's


@pytest.mark.parametrize("model", ["bert-test", "t5-test"])
def test_task_model_regions_split_into_gpu_and_cpu_time(tmp_path, monkeypatch, model):
    """Embeddings and head + loss under the split timing: per step a spin before each of the four regions, in
    stream order first forward, head forward, head backward, first backward, the GPU caught up before the last
    layer's forward and before the first layer's backward; both parts stored and fitted as the layers are."""
    d, clock = _other_split_profile(tmp_path, monkeypatch, model)
    # per batch size (1, 2): a warm-up step (synchronised at start and end), then reps // 2 = 1 spun step:
    # sync, spin, [layers but the last], sync, [last layer], spin, [head], spin, [head backward, layers' backward
    # down to the second], sync, [first layer's backward], spin, [embeddings' backward], sync. At the first
    # batch size one spun step more first: the probe for regions no spin outlasts (here: every spin holds)
    spun = ["sync", "spin", "sync", "spin", "spin", "sync", "spin", "sync"]
    steps = ["sync", "sync"] + spun
    assert ["spin" if isinstance(x, float) else x for x in clock.log] == steps[:2] + spun + steps[2:] + steps
    for part in ("first", "last"):
        e = d["other"][part]["vtp"]["1"]
        for k in ("fwd", "bwd"):
            g, c, t = e["gpu_ms"][k], e["cpu_ms"][k], e["time_ms"][k]
            assert len(g) == len(c) == len(t) == 2 and t == [max(a, b) for a, b in zip(g, c)]
            assert e["fits"][k] == fit_split(e["batch_sizes"], t, g, c).to_dict()
    assert not any("could not be split" in x for x in d["notes"])


def test_task_model_region_no_spin_outlasts_is_timed_in_stream_order(tmp_path, monkeypatch):
    """A region whose spin always runs out (a synchronisation inside it, as in an embedding backward): the probe
    at the first batch size doubles that region's spin up to x8, then gives it up; the other three regions stay
    split, that one keeps its stream-order time (fit_time), and a note names it."""
    # probe steps check first_fwd, last_fwd, last_bwd, first_bwd in that order: fail the 4th of 4 steps
    d, clock = _other_split_profile(tmp_path, monkeypatch, "bert-test", fail_at=(4, 8, 12, 16))
    spins = [x for x in clock.log if isinstance(x, float)]
    probe = [spins[i:i + 4] for i in range(0, 16, 4)]
    for a, b in zip(probe, probe[1:]):   # the failed region twice as long each time, the others as they were
        assert b[3] == pytest.approx(2 * a[3]) and b[:3] == pytest.approx(a[:3])
    assert len(spins) == 16 + 3 * 2      # then one spun step per batch size with three spins
    first, last = d["other"]["first"]["vtp"]["1"], d["other"]["last"]["vtp"]["1"]
    assert set(first["gpu_ms"]) == {"fwd"} and set(last["gpu_ms"]) == {"fwd", "bwd"}
    assert first["fits"]["bwd"] == fit_time(first["batch_sizes"], first["time_ms"]["bwd"]).to_dict()
    assert first["fits"]["fwd"] == fit_split(first["batch_sizes"], first["time_ms"]["fwd"], first["gpu_ms"]["fwd"],
                                             first["cpu_ms"]["fwd"]).to_dict()
    assert any("first_bwd not split into GPU and CPU time" in x for x in d["notes"])
    assert not any("could not be split" in x for x in d["notes"])


def test_task_model_split_retries_with_longer_spins_then_falls_back(tmp_path, monkeypatch):
    # the task model's checks fail from the start: the probe doubles every spin up to x8 and gives all four
    # regions up; whole-step times are stored without parts (a note names the regions)
    clocks = []
    monkeypatch.setattr(profile_model, "make_clock", lambda opts: clocks.append(
        LoggingSplitClock(opts.device, fail_at=range(1, 10**4) if len(clocks) else ())) or clocks[-1])
    out = tmp_path / "fallback.json"
    assert profile_model.main(["--model", "bert-test", "--device", "cpu", "--precision", "fp32", "--batch-sizes",
                               "1,2", "--reps", "2", "--warmup", "2", "--tp", "1", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    e = d["other"]["first"]["vtp"]["1"]
    assert "gpu_ms" not in e and e["fits"]["fwd"] == fit_time(e["batch_sizes"], e["time_ms"]["fwd"]).to_dict()
    assert any("first_fwd, last_fwd, last_bwd, first_bwd not split" in x for x in d["notes"])
    spins = [x for x in clocks[-2].log if isinstance(x, float)]
    steps = [spins[i:i + 4] for i in range(0, len(spins), 4)]   # the four regions' spins of each probe step
    assert len(steps) == 4           # x1, x2, x4, x8; then no spun step at either batch size
    for tried, retried in zip(steps, steps[1:]):
        assert retried == pytest.approx([2 * x for x in tried])


def test_task_model_spin_that_runs_out_once_is_retried_longer(monkeypatch):
    """spun_other_steps: a step whose spin ran out in one region is run again with that region's spin doubled
    (the others unchanged); the held retry is kept, the failed try is not."""
    clock = LoggingSplitClock(torch.device("cpu"), fail_at=(2,))   # the first step's last_fwd check
    seen = []

    def fake_step(ctx, b, opts, hooks, spin_ms=None):
        s = profile_model.SpunStep(clock, spin_ms)
        for r in profile_model.BOUNDARY:
            s.open(r)
            s.close(r)
        seen.append(dict(spin_ms))
        return {**s.times(), "ok": s.ok, "held": dict(s.held)}

    import types
    opts = types.SimpleNamespace(other_reps=2)
    est = {r: 1.0 for r in profile_model.BOUNDARY}
    monkeypatch.setattr(profile_model, "other_step", fake_step)
    held = profile_model.spun_other_steps(None, 1, opts, None, est, unspun={"first_bwd"})
    assert len(held) == 2 and len(seen) == 3 and all("first_bwd" not in x for x in seen)
    assert seen[1]["last_fwd"] == pytest.approx(2 * seen[0]["last_fwd"])
    assert seen[1]["first_fwd"] == pytest.approx(seen[0]["first_fwd"])


def test_other_reps_default_and_flag(tmp_path):
    base = ["--model", "bert-test", "--device", "cpu", "--reps", "6", "--out", str(tmp_path / "p.json")]
    assert profile_model.make_options(profile_model.parse_args(base)).other_reps == 3
    opts = profile_model.make_options(profile_model.parse_args([*base, "--other-reps", "20"]))
    assert (opts.reps, opts.other_reps) == (6, 20)
