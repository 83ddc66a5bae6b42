"""autotune/profile_engine.py on CPU (bert-test) and how the cost model and the search use its engine block.
References are hand counts (BERT's parameter tensors) and hand arithmetic, not saved outputs."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest

from autotune.cost_model import Cost, CostModel, LayerStrategy, Setting
from autotune.hardware import load_hardware
from autotune.model_profile import ModelProfile, gpu_bound_points
from autotune.search import stage_memory
from model_zoo import get_model_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.path.join(ROOT, ".venv", "bin", "python")
MB = 1024 * 1024
# BERT by hand. Encoder layer: Q, K, V, attention-output dense (w+b each: 8), attention LayerNorm (2),
# intermediate dense (2), output dense (2), output LayerNorm (2). Embeddings: word, position, token type,
# LayerNorm w+b. MLM head: transform dense w+b, LayerNorm w+b, output bias (decoder weight tied to the words).
BERT_LAYER, BERT_FIRST, BERT_LAST = 16, 5, 5


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    base, eng = str(d / "bert-test.json"), str(d / "bert-test-engine.json")
    r = _cli("autotune/profile_model.py", "--model", "bert-test", "--device", "cpu", "--batch-sizes", "1,2",
             "--tp", "1,2", "--out", base)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copy(base, eng)
    r = _cli("autotune/profile_engine.py", "--model", "bert-test", "--model-profile", eng,
             "--zero", "0,2", "--reps", "2", "--warmup", "1")
    return {"base": base, "engine": eng, "run": r}


# ---------------------------------------------------------------------- a) the CLI end to end
def test_cli_writes_engine_block(files):
    r = files["run"]
    assert r.returncode == 0, r.stderr[-3000:]
    with open(files["base"]) as f:
        before = json.load(f)
    with open(files["engine"]) as f:
        after = json.load(f)
    eng = after.pop("engine")
    assert after == before                                   # the rest of the profile is left as it was
    assert set(eng["stages"]) == {"0", "2"}
    spec = get_model_spec("bert-test", precision=before["precision"])
    for z, st in eng["stages"].items():
        for key in ("microbatch_ms", "boundary_ms", "overhead_microbatch_ms", "step_ms",
                    "step_transient_bytes_per_param", "states_mb", "step_peak_mb"):
            assert math.isfinite(st[key]) and st[key] >= 0, (z, key, st[key])
        assert len(st["microbatch_ms_all"]) == len(st["boundary_ms_all"]) == 2          # --reps 2
        # the derived overheads are the stated differences of the measured times
        assert st["overhead_microbatch_ms"] == pytest.approx(max(0.0, st["microbatch_ms"] - eng["bare_microbatch_ms"]))
        assert st["step_ms"] == pytest.approx(max(0.0, st["boundary_ms"] - st["microbatch_ms"]))
        assert st["params"] == spec.params_total(1)           # the engine holds the whole model, tied once
    assert math.isfinite(eng["bare_microbatch_ms"]) and eng["bare_microbatch_ms"] > 0
    assert eng["micro_batch"] == 1 and eng["device"] == "cpu"


def test_cli_param_tensor_counts(files):
    with open(files["engine"]) as f:
        eng = json.load(f)["engine"]
    spec = get_model_spec("bert-test", precision="bf16")
    names = [lt.name for lt in spec.layer_types]
    assert eng["param_tensors"] == {"layers": {n: BERT_LAYER for n in names}, "first": BERT_FIRST,
                                    "last": BERT_LAST}
    assert eng["tensors_total"] == spec.num_layers * BERT_LAYER + BERT_FIRST + BERT_LAST == 74

    # the same counts straight from the Hugging Face modules (no layer sequence involved)
    from model_zoo.registry import load_hf_config
    from model_zoo.runtime import get_adapter

    model = get_adapter("bert").build_model(load_hf_config("bert-test"), "mlm")
    emb = {id(p) for p in model.bert.embeddings.parameters()}
    head = {id(p) for p in model.cls.parameters()} - emb
    assert (len(list(model.bert.encoder.layer[0].parameters())), len(emb), len(head)) == \
        (BERT_LAYER, BERT_FIRST, BERT_LAST)


def test_cli_result_loads(files):
    p = ModelProfile.load(files["engine"])
    assert p.engine["tensors_total"] == 74
    st = p.engine_stage(2)
    assert isinstance(st, dict) and st == p.engine["stages"]["2"]
    assert p.engine_stage(3) is None and p.engine_stage(1) is None
    assert p.engine_tensor_share("first") == pytest.approx(BERT_FIRST / 74)
    assert ModelProfile.from_dict(p.to_dict()).engine == p.engine


# ---------------------------------------------------------------------- b) bad input
@pytest.mark.parametrize("args", [
    ["--model", "vit-test", "--model-profile", "{base}"],
    ["--model", "bert-test", "--model-profile", "{base}", "--zero", "5"],
    ["--model", "bert-test", "--model-profile", "{missing}"],
    ["--model", "bert-test", "--model-profile", "{base}", "--only", "in-step,kernels"],
    ["--model", "bert-test", "--model-profile", "{base}", "--only", "in-step"],
    ["--model", "bert-test", "--model-profile", "{engine}", "--only", "in-step", "--zero", "0,1"],
    ["--model", "bert-test", "--model-profile", "{engine}", "--only", "launch-bound", "--zero", "0,1"],
], ids=["other-model", "zero-5", "missing-profile", "only-unknown-part", "only-without-engine-block",
        "only-graphed-on-cpu", "only-launch-bound-on-cpu"])
def test_cli_bad_input(files, tmp_path, args):
    before = {}
    for k in ("base", "engine"):
        with open(files[k], "rb") as f:
            before[k] = f.read()
    paths = {"base": files["base"], "engine": files["engine"], "missing": str(tmp_path / "nope.json")}
    r = _cli("autotune/profile_engine.py", *[a.format(**paths) for a in args])
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and r.stderr.rstrip().splitlines()[-1] == errors[0]
    assert "Traceback" not in r.stderr
    for k in ("base", "engine"):
        with open(files[k], "rb") as f:
            assert f.read() == before[k]
    assert not os.path.exists(paths["missing"])


# ---------------------------------------------------------------------- c) cost-model arithmetic
BLOCK_N = 74


def _block(step_ms: float = 50.0) -> dict:
    return {"param_tensors": {"layers": {"bert_enc": 16}, "first": 5, "last": 5}, "tensors_total": BLOCK_N,
            "stages": {"0": {"overhead_microbatch_ms": 8.0, "step_ms": step_ms,
                             "step_transient_bytes_per_param": 4.0}}}


@pytest.fixture(scope="module")
def model_parts(files):
    profile = ModelProfile.load(files["base"])
    assert not profile.engine
    spec = get_model_spec("bert-test", precision=profile.precision)
    assert [lt.name for lt in spec.layer_types] == ["bert_enc"]
    return profile, spec, load_hardware("1xH100")


def _pair(model_parts, fn, step_ms=50.0):
    """fn(cost_model) with the hand-made engine block and without any."""
    profile, spec, hw = model_parts
    profile.engine = _block(step_ms)
    with_engine = fn(CostModel(spec, hw, profile))
    profile.engine = {}
    return with_engine, fn(CostModel(spec, hw, profile))


def test_layer_cost_adds_engine_terms(model_parts):
    _, spec, hw = model_parts
    lt = spec.layer_types[0]
    setting = Setting(world=1, pp=1, zero=0, chunks=2, global_bsz=8)
    on, off = _pair(model_parts, lambda cm: cm.layer_cost(lt, LayerStrategy(), setting, stage=0))
    analytic_opt_ms = spec.params_total(1) * 30 / (hw.mem_bw_gbps * 1e9) * 1e3
    assert 0 < analytic_opt_ms < 50
    assert on.compute_s - off.compute_s == pytest.approx(2 * 8e-3 * 16 / BLOCK_N, rel=1e-9)
    assert on.optimizer_s - off.optimizer_s == pytest.approx((50.0 - analytic_opt_ms) * 1e-3 * 16 / BLOCK_N, rel=1e-9)
    assert on.step_bytes == pytest.approx(lt.params * 4.0) and off.step_bytes == 0
    assert (on.states_bytes, on.act_bytes, on.tp_comm_s) == (off.states_bytes, off.act_bytes, off.tp_comm_s)


def test_zero3_recompute_repeats_forward_hooks(model_parts):
    """A checkpointed layer under ZeRO-3 pays the engine's per-micro-batch work 1.5 times (the forward
    hooks, half of it, run again in recompute); under ZeRO-0 checkpointing adds no engine work."""
    profile, spec, hw = model_parts
    lt = spec.layer_types[0]
    block = _block()
    block["stages"]["3"] = dict(block["stages"]["0"])
    profile.engine = block
    try:
        cm = CostModel(spec, hw, profile)
        for zero, factor in ((3, 1.5), (0, 1.0)):
            setting = Setting(world=1, pp=1, zero=zero, chunks=2, global_bsz=8)
            plain = cm.layer_cost(lt, LayerStrategy(), setting, stage=0)
            ckpt = cm.layer_cost(lt, LayerStrategy(checkpoint=True), setting, stage=0)
            engine = 2 * 8e-3 * 16 / BLOCK_N
            assert ckpt.compute_s - plain.compute_s == pytest.approx(
                2 * ckpt.detail["recompute_s"] + (factor - 1) * engine, rel=1e-9)
    finally:
        profile.engine = {}


def test_stage_kept_from_a_slower_host_is_scaled_by_the_bare_times(model_parts):
    """A stage kept from an earlier block (keep_unmeasured_stages) beside a bare forward + backward of 60 ms, in a
    block whose own bare one took 30: that host ran twice as slow, so its engine terms count half."""
    profile, spec, hw = model_parts
    lt = spec.layer_types[0]
    setting = Setting(world=1, pp=1, zero=0, chunks=2, global_bsz=8)
    fresh = {**_block(), "bare_microbatch_ms": 30.0}
    kept = {**fresh, "stages": {"0": {**fresh["stages"]["0"], "bare_microbatch_ms": 60.0}}}
    costs = []
    try:
        for block in (fresh, kept, {}):
            profile.engine = block
            costs.append(CostModel(spec, hw, profile).layer_cost(lt, LayerStrategy(), setting, stage=0))
    finally:
        profile.engine = {}
    on, half, off = costs
    assert half.compute_s - off.compute_s == pytest.approx((on.compute_s - off.compute_s) / 2, rel=1e-9)
    assert half.optimizer_s - off.optimizer_s == pytest.approx((on.optimizer_s - off.optimizer_s) / 2, rel=1e-9)
    assert half.step_bytes == on.step_bytes              # memory is not host speed


def test_engine_step_clamped_at_zero(model_parts):
    _, spec, _ = model_parts
    lt = spec.layer_types[0]
    setting = Setting(world=1, pp=1, zero=0, chunks=2, global_bsz=8)
    # 1e-6 ms is below the analytic optimizer time of the whole model: no negative step overhead
    on, off = _pair(model_parts, lambda cm: cm.layer_cost(lt, LayerStrategy(), setting, stage=0), step_ms=1e-6)
    assert on.optimizer_s == pytest.approx(off.optimizer_s, rel=1e-12)
    assert on.compute_s > off.compute_s


def test_unmeasured_stage_has_no_engine_terms(model_parts):
    _, spec, _ = model_parts
    lt = spec.layer_types[0]
    setting = Setting(world=1, pp=1, zero=1, chunks=2, global_bsz=8)
    on, off = _pair(model_parts, lambda cm: cm.layer_cost(lt, LayerStrategy(), setting, stage=0))
    assert (on.compute_s, on.optimizer_s, on.step_bytes) == (off.compute_s, off.optimizer_s, 0.0)
    o_on, o_off = _pair(model_parts, lambda cm: cm.other_cost("first", setting, 0, 1))
    assert (o_on.compute_s, o_on.optimizer_s, o_on.step_bytes) == (o_off.compute_s, o_off.optimizer_s, 0.0)


@pytest.mark.parametrize("part", ["first", "last"])
def test_other_cost_adds_engine_terms(model_parts, part):
    _, spec, hw = model_parts
    setting = Setting(world=1, pp=1, zero=0, chunks=2, global_bsz=8)
    on, off = _pair(model_parts, lambda cm: cm.other_cost(part, setting, 0, 1))
    analytic_opt_ms = spec.params_total(1) * 30 / (hw.mem_bw_gbps * 1e9) * 1e3
    assert on.compute_s - off.compute_s == pytest.approx(2 * 8e-3 * 5 / BLOCK_N, rel=1e-9)
    assert on.optimizer_s - off.optimizer_s == pytest.approx((50.0 - analytic_opt_ms) * 1e-3 * 5 / BLOCK_N, rel=1e-9)
    o = spec.other
    params = o.params_first[1] if part == "first" else o.params_last[1] - o.tied_params[1]   # pp=1: tied once
    assert on.step_bytes == pytest.approx(params * 4.0)


# ---------------------------------------------------------------------- stage memory: the backward scan
def _piece(act, transient, accum, params=1.0):
    return Cost(act_bytes=act * MB, transient_bytes=transient * MB, accum_bytes=accum * MB,
                detail={"shard_params": params})


@pytest.mark.parametrize("flush, expect", [
    # ZeRO-0/1: each piece's gradients appear in its backward. Last piece: 60 alive + 5 + 8 = 73;
    # middle: 30 alive + 5 + 16 = 51; first: 10 + 5 + 24 = 39 -> 73 at the last piece.
    (0, {"total": 73, "transient": 5, "grads": 8}),
    # ZeRO-2 with a 2-parameter bucket: nothing until the middle piece, then all 24 MB at once:
    # last 65; middle 30 + 5 + 24 = 59; first 10 + 5 + 24 = 39 -> 65 at the last piece.
    (2, {"total": 65, "transient": 5, "grads": 0}),
])
def test_stage_memory_scans_backward(flush, expect):
    pieces = [_piece(10, 5, 8), _piece(20, 5, 8), _piece(30, 5, 8)]
    mem = stage_memory(pieces, {"others": [], "buffers": 0, "offset": 0, "accum_flush_elems": flush})
    assert mem["activations_mb"] == pytest.approx(60)
    assert mem["transient_mb"] == pytest.approx(expect["transient"])
    assert mem["backward_grads_mb"] == pytest.approx(expect["grads"])
    assert mem["total_mb"] == pytest.approx(expect["total"])
    assert mem["optimizer_step_mb"] == pytest.approx(24)


def test_stage_memory_peak_inside_backward():
    """Large gradients that arrive in one lump (ZeRO-2 bucket) put the peak mid-backward: at the middle
    piece 30 MB of activations are left, its 5 MB workspace, and all 3 x 40 MB of gradients = 155 MB."""
    pieces = [_piece(10, 5, 40), _piece(20, 5, 40), _piece(30, 5, 40)]
    mem = stage_memory(pieces, {"others": [], "buffers": 0, "offset": 0, "accum_flush_elems": 2})
    assert mem["total_mb"] == pytest.approx(155)
    assert (mem["transient_mb"], mem["backward_grads_mb"]) == pytest.approx((5 - 30, 120))


def test_stage_memory_second_gradient_buffer_in_backward_only():
    """fp32 ZeRO-2 with accumulation: the accumulated partition is in the states, a second 40 MB per piece
    (regrad) appears with the first bucket: at the middle piece 30 MB of activations + 5 MB workspace
    + 120 MB = 155 MB; the optimizer step does not see it (no accum_bytes left: 0 MB)."""
    pieces = [Cost(act_bytes=a * MB, transient_bytes=5 * MB, regrad_bytes=40 * MB, detail={"shard_params": 1.0})
              for a in (10, 20, 30)]
    mem = stage_memory(pieces, {"others": [], "buffers": 0, "offset": 0, "accum_flush_elems": 2})
    assert mem["total_mb"] == pytest.approx(155)
    assert mem["backward_grads_mb"] == pytest.approx(120)
    assert mem["optimizer_step_mb"] == pytest.approx(0)


# ---------------------------------------------------------------------- stage memory: max(activations, step)
@pytest.mark.parametrize("step_mb, expect_mb", [(10.0, 100 + 30 + 6), (80.0, 100 + 80)],
                         ids=["activations-dominate", "step-dominates"])
def test_stage_memory_takes_larger_of_activations_and_step(step_mb, expect_mb):
    # backward of b (last) with all 30 MB alive + its 6 MB workspace; then a's 4 MB with b's 10 MB freed
    a = Cost(states_bytes=60 * MB, act_bytes=20 * MB, transient_bytes=4 * MB, step_bytes=step_mb * 0.75 * MB)
    b = Cost(states_bytes=40 * MB, act_bytes=10 * MB, transient_bytes=6 * MB, step_bytes=step_mb * 0.25 * MB)
    mem = stage_memory([a, b], {"others": [], "buffers": 0, "transient": 6 * MB, "offset": 0})
    assert mem["optimizer_step_mb"] == pytest.approx(step_mb)
    assert mem["model_states_mb"] == pytest.approx(100) and mem["activations_mb"] == pytest.approx(30)
    assert mem["total_mb"] == pytest.approx(expect_mb)


# Two graphed layers (states 100 MB, of which 40 are Adam's lazy moments; 30 MB of activations, workspace 6, static
# gradient buffers 12) after an eager embedding (5 MB of activations): the first step's activation phase holds
# 35 + 6 without the lazy 40, the capture the layers' 30 + 6 (or the 12 MB of buffers once every backward is
# recorded), later optimizer steps their workspace beside the buffers.
@pytest.mark.parametrize("lazy, step_mb, expect_mb", [
    (40.0, 10.0, 100 + max(35 + 6 - 40, 30 + 6, 10 + 12)),     # the capture sets it: 136
    (0.0, 10.0, 100 + 35 + 6),                                  # ZeRO-0 (nothing lazy): the first step, 141
    (40.0, 50.0, 100 + 50 + 12),                                # a large optimizer step beside the buffers: 162
], ids=["capture", "first-step", "optimizer-step"])
def test_graphed_stage_memory_phases(lazy, step_mb, expect_mb):
    def layer(states, act, transient, static, lz, step):
        return Cost(states_bytes=states * MB, act_bytes=act * MB, transient_bytes=transient * MB,
                    step_bytes=step * MB, lazy_bytes=lz * MB, graph_static_bytes=static * MB,
                    graph_act_bytes=act * MB, graph_transient_bytes=transient * MB)
    a = layer(60, 20, 4, 7, lazy * 0.6, step_mb / 2)
    b = layer(40, 10, 6, 5, lazy * 0.4, step_mb / 2)
    emb = Cost(act_bytes=5 * MB)
    mem = stage_memory([a, b], {"before": [emb], "others": [], "buffers": 0, "offset": 0})
    assert mem["lazy_states_mb"] == pytest.approx(lazy) and mem["graph_capture_mb"] == pytest.approx(36)
    assert mem["total_mb"] == pytest.approx(expect_mb)
    eager = stage_memory([Cost(states_bytes=60 * MB, act_bytes=20 * MB, transient_bytes=4 * MB),
                          Cost(states_bytes=40 * MB, act_bytes=10 * MB, transient_bytes=6 * MB)],
                         {"before": [emb], "others": [], "buffers": 0, "offset": 0})
    assert "graph_capture_mb" not in eager and eager["total_mb"] == pytest.approx(100 + 35 + 6)


def test_lazy_states_are_adams_moments_under_zero_1_and_2(model_parts):
    """8 B per local parameter under ZeRO-1/2 (DeepSpeed's wrapped Adam makes them at its first step), none at 0/3."""
    _, spec, hw = model_parts
    cm = CostModel(spec, hw, None)
    assert [cm.lazy_state_bytes(1000.0, 2, z) for z in (0, 1, 2, 3)] == [0.0, 4000.0, 4000.0, 0.0]


def test_a_partial_run_keeps_the_stages_it_did_not_measure():
    from autotune.profile_engine import keep_unmeasured_stages

    old = {"micro_batch": 1, "checkpoint_layers": 0, "device": "H100", "date": "2026-11-25", "bare_microbatch_ms": 60.0,
           "stages": {"0": {"step_ms": 55.0}, "1": {"step_ms": 16.0},
                      "3": {"step_ms": 97.0, "measured": "2026-11-01", "bare_microbatch_ms": 90.0}}}
    new = {"micro_batch": 1, "checkpoint_layers": 0, "device": "H100", "bare_microbatch_ms": 30.0,
           "stages": {"0": {"step_ms": 6.0}}}
    keep_unmeasured_stages(new, old)
    assert new["stages"] == {"0": {"step_ms": 6.0},
                             "1": {"step_ms": 16.0, "measured": "2026-11-25", "bare_microbatch_ms": 60.0},
                             "3": {"step_ms": 97.0, "measured": "2026-11-01", "bare_microbatch_ms": 90.0}}
    other = {"micro_batch": 4, "checkpoint_layers": 0, "device": "H100", "stages": {"0": {"step_ms": 9.0}}}
    keep_unmeasured_stages(other, old)                # measured another way: nothing carried over
    assert list(other["stages"]) == ["0"]


# ---------------------------------------------------------------------- d) in-step timings
def _in_step(backward_ms: float, tail_ms: float, b: int = 8) -> dict:
    return {"micro_batch": b, "chunks": 2, "step_ms": backward_ms + tail_ms, "device_backward_ms": backward_ms,
            "tail_ms": tail_ms}


def _in_step_block() -> dict:
    """Stages 0 and 2 with in-step timings: eager ZeRO-2 ends its backward 20 ms after ZeRO-0 over two
    micro-batches and its tail is 14 ms; graphed, 6 ms later and 9 ms."""
    block = _block()
    block["stages"]["2"] = {"overhead_microbatch_ms": 30.0, "step_ms": 40.0, "step_transient_bytes_per_param": 0.0}
    block["stages"]["0"]["in_step"] = {"eager": _in_step(100.0, 10.0), "graphed": _in_step(90.0, 8.0)}
    block["stages"]["2"]["in_step"] = {"eager": _in_step(120.0, 14.0), "graphed": _in_step(96.0, 9.0)}
    return block


@pytest.mark.parametrize("graphs, later_ms, tail_ms", [(False, 20.0, 14.0), (True, 6.0, 9.0)])
def test_in_step_timings_put_engine_work_on_the_device(model_parts, monkeypatch, graphs, later_ms, tail_ms):
    """Per micro-batch the GPU side carries the stage's later backward end over ZeRO-0 (per micro-batch), the host
    side the launch-bound hook work; the step is the in-step tail less the analytic optimizer, by tensor share."""
    profile, spec, hw = model_parts
    monkeypatch.setattr(profile, "device_type", "cuda")     # a profile whose host runs ahead of the device
    lt = spec.layer_types[0]
    setting = Setting(world=1, pp=1, zero=2, chunks=2, global_bsz=8, cuda_graphs=graphs)
    profile.engine = _in_step_block()
    try:
        on = CostModel(spec, hw, profile).layer_cost(lt, LayerStrategy(), setting, stage=0)
        profile.engine = {}
        off = CostModel(spec, hw, profile).layer_cost(lt, LayerStrategy(), setting, stage=0)
    finally:
        profile.engine = {}
    share = 16 / BLOCK_N
    opt_ms = spec.params_total(1) * 30 / (hw.mem_bw_gbps * 1e9) * 1e3
    assert on.gpu_s - off.gpu_s == pytest.approx(2 * later_ms / 2 * 1e-3 * share, rel=1e-9)
    assert on.host_s - off.host_s == pytest.approx(2 * 30.0 * 1e-3 * share, rel=1e-9)
    assert on.optimizer_s - off.optimizer_s == pytest.approx((tail_ms - opt_ms) * 1e-3 * share, rel=1e-9)
    assert on.optimizer_host_s - off.optimizer_host_s == pytest.approx((40.0 - opt_ms) * 1e-3 * share, rel=1e-9)


def test_in_step_of_another_micro_batch_than_zero0_adds_no_device_work(model_parts, monkeypatch):
    profile, spec, hw = model_parts
    monkeypatch.setattr(profile, "device_type", "cuda")
    block = _in_step_block()
    block["stages"]["0"]["in_step"]["eager"] = _in_step(50.0, 10.0, b=4)     # not comparable: another batch
    profile.engine = block
    try:
        eng = CostModel(spec, hw, profile).engine_costs("bert_enc", Setting(world=1, pp=1, zero=2, chunks=2,
                                                                              global_bsz=8))
    finally:
        profile.engine = {}
    assert eng.microbatch_gpu_s == 0.0 and eng.step_s > 0


def _launch_bound(host_backward_ms: float, b: int = 1, bare_ms: float | None = None) -> dict:
    return {**_in_step(host_backward_ms + 5.0, 3.0, b), "host_backward_ms": host_backward_ms,
            **({"bare_microbatch_ms": bare_ms} if bare_ms else {})}


@pytest.mark.parametrize("graphs, zero0_ms, hooks_ms", [
    (True, 50.0, 30.0),      # graphed: ZeRO-0's block (8) plus the launch-bound graphed steps' (92 - 50) / 2 = 21
    (False, 50.0, 30.0),     # eager: the eager block's 30, whatever the graphed steps say
    (True, None, 30.0),      # graphed, but ZeRO-0's graphed steps not timed: the eager block's 30
])
def test_graphed_hooks_host_work_from_launch_bound_graphed_steps(model_parts, monkeypatch, graphs, zero0_ms,
                                                                 hooks_ms):
    """A graphed setting's per-micro-batch hook host work is the launch-bound graphed steps' host clock at the stage
    less ZeRO-0's, per micro-batch, on top of ZeRO-0's own block figure; eager settings keep the eager block."""
    profile, spec, hw = model_parts
    monkeypatch.setattr(profile, "device_type", "cuda")
    block = _in_step_block()
    block["stages"]["2"]["launch_bound"] = {"graphed": _launch_bound(92.0), "eager": _launch_bound(70.0)}
    if zero0_ms is not None:
        block["stages"]["0"]["launch_bound"] = {"graphed": _launch_bound(zero0_ms)}
    profile.engine = block
    setting = Setting(world=1, pp=1, zero=2, chunks=2, global_bsz=8, cuda_graphs=graphs)
    try:
        eng = CostModel(spec, hw, profile).engine_costs("bert_enc", setting)
        assert profile.graphed_hooks_ms(2) == (None if zero0_ms is None else 21.0)
        block["stages"]["2"]["launch_bound"]["graphed"] = _launch_bound(92.0, b=2)     # another micro-batch
        assert profile.graphed_hooks_ms(2) is None
        if zero0_ms is not None:     # timed beside a bare step of 40 ms where the block's took 30: a slower host
            block["bare_microbatch_ms"] = 30.0
            block["stages"]["2"]["launch_bound"]["graphed"] = _launch_bound(92.0, bare_ms=40.0)
            assert profile.graphed_hooks_ms(2) == pytest.approx(21.0 * 30.0 / 40.0)
    finally:
        profile.engine = {}
    share = 16 / BLOCK_N
    expect = 8.0 + 21.0 if graphs and zero0_ms is not None else hooks_ms
    assert eng.microbatch_host_s == pytest.approx(expect * 1e-3 * share, rel=1e-9)


@pytest.mark.parametrize("host, gpu, expect", [
    (2.0, 4.0, 3.0),     # the host 2 s ahead: 5 - 2 of the serial step shows, above the device's 1
    (2.0, 10.0, 1.0),    # far ahead: the device's part alone
    (6.0, 4.0, 5.0),     # launch-bound: the whole serial step
    (0.0, 4.0, 5.0),     # no host/GPU split (CPU profile): serial
])
def test_optimizer_tail_hides_host_work_behind_the_hosts_lead(host, gpu, expect):
    c = Cost(host_s=host, gpu_s=gpu, optimizer_s=1.0, optimizer_host_s=5.0)
    assert c.optimizer_tail_s == pytest.approx(expect)
    assert Cost(optimizer_s=1.0).optimizer_tail_s == 1.0          # no serial figure: the device's


def test_in_step_on_cpu_times_train_steps(world_of_one):
    """measure_in_step on CPU (bert-test, ZeRO-0): the last backward ends inside the step, the tail is the rest."""
    from autotune import profile_engine as pe

    import train

    opts = pe.Options(model="bert-test", task=None, precision="bf16", zero=[0], micro_batch=1, reps=2, warmup=1,
                      checkpoint_layers=0)
    spec = get_model_spec("bert-test", precision="bf16")
    r = pe.measure_in_step(opts, train.resolve_model("bert-test", None, None), 0, spec.num_layers, 2, False)
    assert (r["micro_batch"], r["chunks"]) == (2, pe.IN_STEP_CHUNKS)
    assert len(r["step_ms_all"]) == len(r["device_backward_ms_all"]) == len(r["host_backward_ms_all"]) == 2
    for s, d, h in zip(r["step_ms_all"], r["device_backward_ms_all"], r["host_backward_ms_all"]):
        assert 0 < d < s and 0 < h < s
    assert 0 < r["tail_ms"] < r["step_ms"]


def test_cpu_block_has_no_in_step_timings(files):
    with open(files["engine"]) as f:
        eng = json.load(f)["engine"]
    assert "bare_gpu" not in eng and all("in_step" not in st for st in eng["stages"].values())


def test_other_gpu_time_from_bare_whole_model(model_parts, monkeypatch):
    """bare_gpu built as the layers' GPU lines plus 0.5 + 0.01 b ms: the embeddings and head get that residual as
    their GPU time, split by their own GPU lines; their host floors stay as profiled."""
    profile, spec, hw = model_parts
    monkeypatch.setattr(profile, "device_type", "cuda")

    def gpu(e, x):
        return e.fits["fwd"].parts(x)[1] + e.fits["bwd"].parts(x)[1]
    layers = sum(lt.count * gpu(lt.tp[1], 0) for lt in profile.layer_types.values())
    per_b = sum(lt.count * (gpu(lt.tp[1], 1) - gpu(lt.tp[1], 0)) for lt in profile.layer_types.values())
    bs = [2 ** 16, 2 ** 17, 2 ** 18]   # so large that halving the batch halves the time (GPU-bound)
    block = _block()
    block["stages"]["0"]["overhead_microbatch_ms"] = 0.0          # the embeddings' and head's own times alone
    block["bare_gpu"] = {"batch_sizes": bs, "gpu_ms": [layers + per_b * x + 0.5 + 0.01 * x for x in bs]}
    setting = Setting(world=1, pp=1, zero=0, chunks=1, global_bsz=6)
    first, last = profile._other_entry("first", 1), profile._other_entry("last", 1)
    own = gpu(first, 6) + gpu(last, 6)
    assert gpu_bound_points(block["bare_gpu"])[0] == bs
    profile.engine = block
    try:
        assert profile.other_gpu_ratio(6) == pytest.approx((0.5 + 0.06) / own, rel=1e-6)
        cm = CostModel(spec, hw, profile)
        costs = [cm.other_cost(part, setting, 0, 1) for part in ("first", "last")]
    finally:
        profile.engine = {}
    assert sum(c.gpu_s for c in costs) == pytest.approx((0.5 + 0.06) * 1e-3, rel=1e-6)
    hosts = [sum(e.fits[k].parts(6)[0] for k in ("fwd", "bwd")) * cm.launch_scale for e in (first, last)]
    assert [c.host_s for c in costs] == pytest.approx([h * 1e-3 for h in hosts], rel=1e-9)


def test_other_gpu_ratio_needs_two_batch_sizes(model_parts):
    profile, _, _ = model_parts
    profile.engine = {**_block(), "bare_gpu": {"batch_sizes": [8], "gpu_ms": [5.0]}}
    try:
        assert profile.other_gpu_ratio(8) is None
    finally:
        profile.engine = {}


def test_gpu_bound_points_drop_launch_bound_batches():
    """Swin-B's bare times on one H100 (94.0 ms at 64, 94.1 at 128, 174.5 at 256): 64 did not follow the batch
    down (launch-bound), 128 did; and a point between a GPU-bound pair by the halving rule: 0.6^2 of 200 = 72."""
    assert gpu_bound_points({"batch_sizes": [64, 128, 256], "gpu_ms": [94.0, 94.1, 174.5]}) == ([128, 256], [94.1, 174.5])
    assert gpu_bound_points({"batch_sizes": [16, 64], "gpu_ms": [71.0, 200.0]}) == ([16, 64], [71.0, 200.0])
    assert gpu_bound_points({"batch_sizes": [16, 64], "gpu_ms": [73.0, 200.0]}) == ([64], [200.0])
    assert gpu_bound_points({}) == ([], [])
