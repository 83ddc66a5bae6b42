"""A one-GPU step runs the host ahead of the GPU: its compute is the larger of the host sum and the GPU sum.

The reference is computed by hand from the profile file's numbers (fit constants, engine block), not through
the TimeFit / ModelProfile code the cost model uses.
"""
import copy
import json
import pathlib

import pytest

from autotune.calibrate import predict_run, run_bound
from autotune.cost_model import OPTIMIZER_BYTES_PER_PARAM, Calibration, Cost
from autotune.hardware import load_hardware
from autotune.model_profile import ModelProfile
from autotune.plan import Plan
from model_zoo import get_model_spec

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "h200" / "bert-large.json"


def _fit_ms(fit: dict, b: float, launch: float = 1.0) -> tuple[float, float]:
    """(host, GPU) ms of one fit as the file states it: floor (or its step level) and the line c + m b."""
    step = fit.get("floor_step")
    floor = step["floor"] if step and b >= step["from_b"] else fit["floor"]
    return launch * floor, fit["c"] + fit["m"] * b


def _launch_ratio(raw: dict) -> float:
    """The engine block's bare step over the profile's launch floors of the same step (every layer, TP 1)."""
    b = raw["engine"]["micro_batch"]
    fits = [(lt["count"], lt["tp"]["1"]["fits"]) for lt in raw["layer_types"].values()]
    fits += [(1, raw["other"][part]["vtp"]["1"]["fits"]) for part in ("first", "last")]
    host = sum(n * _fit_ms(f[k], b)[0] for n, f in fits for k in ("fwd", "bwd"))
    gpu = sum(n * _fit_ms(f[k], b)[1] for n, f in fits for k in ("fwd", "bwd"))
    assert host > gpu                      # BERT-large at batch 1 is launch-bound
    return raw["engine"]["bare_microbatch_ms"] / host


def _by_hand(raw: dict, spec, hw, b: float, chunks: int, zero: int, ckpt: int, overlap: bool) -> tuple[float, str]:
    """Step seconds of a pp = 1, dp = 1 plan from the raw profile dict, and which side bounds a micro-batch."""
    launch = _launch_ratio(raw) if overlap else 1.0
    fit_ms = lambda f, b: _fit_ms(f, b, launch)  # noqa: E731
    host = gpu = serial = 0.0
    pieces = []
    for i in range(spec.num_layers):
        fits = raw["layer_types"][spec.layer(i).name]["tp"]["1"]["fits"]
        kinds = [("fwd", 1), ("bwd", 1)]
        if i < ckpt:
            kinds += [("bwd_ckpt", 1), ("bwd", -1)]      # recompute: the checkpointed backward's excess
        pieces.append([(fits[k], sign) for k, sign in kinds])
    for part in ("first", "last"):
        fits = raw["other"][part]["vtp"]["1"]["fits"]
        pieces.append([(fits["fwd"], 1), (fits["bwd"], 1)])
    for piece in pieces:
        h = sum(sign * fit_ms(f, b)[0] for f, sign in piece)
        g = sum(sign * fit_ms(f, b)[1] for f, sign in piece)
        if len(piece) == 4:              # recompute, each side clipped at 0 as a difference of fits
            h0, g0 = (sum(s * fit_ms(f, b)[j] for f, s in piece[:2]) for j in (0, 1))
            h = h0 + max(0.0, h - h0)
            g = g0 + max(0.0, g - g0)
        host, gpu = host + h, gpu + g
        # serial: each measured phase at the larger of its two sides
        phases = [max(*fit_ms(f, b)) for f, _ in piece[:2]]
        if len(piece) == 4:
            phases.append(max(0.0, max(*fit_ms(piece[2][0], b)) - max(*fit_ms(piece[1][0], b))))
        serial += sum(phases)
    stage = raw["engine"]["stages"][str(zero)]
    tensors = raw["engine"]["param_tensors"]
    # the tensor shares of all pieces add up to 1; ZeRO-3 runs a checkpointed layer's forward hooks twice
    ckpt_share = sum(tensors["layers"][spec.layer(i).name] for i in range(ckpt)) / raw["engine"]["tensors_total"]
    engine_mb = stage["overhead_microbatch_ms"] * (1 + (0.5 * ckpt_share if zero == 3 else 0.0))
    optimizer = spec.params_total(1) * OPTIMIZER_BYTES_PER_PARAM / (hw.mem_bw_gbps * 1e9)
    step = max(0.0, stage["step_ms"] / 1e3 - optimizer) + optimizer
    compute = max(host + engine_mb, gpu) if overlap else serial + engine_mb
    return chunks * compute / 1e3 + step, "host" if host + engine_mb > gpu else "GPU"


CASES = [(8, 1, 0, 0), (32, 1, 0, 0), (64, 2, 1, 0), (32, 1, 0, 12), (16, 1, 2, 0), (32, 1, 3, 24)]   # bsz, chunks, zero, ckpt


@pytest.mark.parametrize("bsz,chunks,zero,ckpt", CASES)
@pytest.mark.parametrize("device_type,bare_scale", [("cuda", 1.0), ("cuda", 2.0), ("cpu", 1.0)])
def test_step_from_host_and_gpu_sums(bsz, chunks, zero, ckpt, device_type, bare_scale):
    """bare_scale: the engine block's bare step twice as slow (layers launching twice as slow in place)
    scales every launch floor, but none of the engine's own costs."""
    raw = json.loads(PROFILE.read_text())
    raw["device_type"] = device_type
    raw["engine"]["bare_microbatch_ms"] *= bare_scale
    spec, hw = get_model_spec("bert-large", precision="bf16"), load_hardware("1xH200")
    prof = ModelProfile.from_dict(copy.deepcopy(raw))
    plan = Plan.uniform(num_layers=24, world_size=1, global_bsz=bsz, chunks=chunks, zero_stage=zero,
                        precision="bf16", checkpoint=[1] * ckpt + [0] * (24 - ckpt), model={"name": "bert-large"})
    step, _ = predict_run(plan, spec, hw, prof, Calibration())
    want, bound = _by_hand(raw, spec, hw, bsz / chunks, chunks, zero, ckpt, overlap=device_type == "cuda")
    assert step == pytest.approx(want, rel=1e-9)
    # what the bound-aware calibration and validate.py read: the larger of the two sums; a CPU profile's one
    # thread does both, so it has no bound
    assert run_bound(plan, spec, hw, prof) == (bound if device_type == "cuda" else "?")


def test_overlap_sits_between_the_larger_sum_and_the_serial_time():
    raw = json.loads(PROFILE.read_text())
    spec, hw = get_model_spec("bert-large", precision="bf16"), load_hardware("1xH200")
    for bsz, chunks, zero, ckpt in CASES:
        args = (raw, spec, hw, bsz / chunks, chunks, zero, ckpt)
        assert _by_hand(*args, overlap=True)[0] <= _by_hand(*args, overlap=False)[0]
    # phases of both kinds in one step (BERT-large: launch-bound embeddings and head, GPU-bound layers at
    # 64; the reverse at 8): the phases bound by one side hide behind the other's
    saved = {b: _by_hand(raw, spec, hw, b, 1, 0, 0, False)[0] - _by_hand(raw, spec, hw, b, 1, 0, 0, True)[0]
             for b in (8, 64)}
    assert saved[8] > 0.002 and saved[64] > 0.002


def test_cost_without_parts_keeps_its_compute():
    assert Cost(compute_s=0.3).overlapped_compute_s == 0.3
    assert Cost(compute_s=0.5, host_s=0.2, gpu_s=0.4).overlapped_compute_s == 0.4
    assert Cost(compute_s=0.5, host_s=0.2, gpu_s=0.4, tp_comm_s=0.1).microbatch_s == pytest.approx(0.5)
