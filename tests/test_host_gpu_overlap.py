"""A one-GPU step runs the host ahead of the GPU: its pieces' host and GPU times overlap in the step's order.

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


def _simulate(pieces: list[tuple[float, float, float, float]], chunks: int) -> float:
    """When the GPU ends a step of `chunks` micro-batches over pieces (host fwd, GPU fwd, host bwd, GPU bwd) in
    forward order: forwards in order, backwards in reverse; a piece starts on the GPU once the host starts
    queueing it and the GPU is free, and ends no earlier than the host's last launch of it."""
    host = gpu = 0.0
    for _ in range(chunks):
        for h, g in [(p[0], p[1]) for p in pieces] + [(p[2], p[3]) for p in reversed(pieces)]:
            start, host = host, host + h
            gpu = max(max(gpu, start) + g, host)
    return gpu


def _by_hand(raw: dict, spec, hw, b: float, chunks: int, zero: int, ckpt: int, overlap: bool) -> tuple[float, str]:
    """Step seconds of a pp = 1, dp = 1 plan from the raw profile dict, and which side bounds a micro-batch."""
    launch = _launch_ratio(raw) if overlap else 1.0
    fit_ms = lambda f, b: _fit_ms(f, b, launch)  # noqa: E731
    stage = raw["engine"]["stages"][str(zero)]
    tensors = raw["engine"]["param_tensors"]
    # the engine's hooks run per parameter tensor: each piece's share of them, in its backward (ZeRO-3: half
    # in the forward, and a checkpointed layer's forward hooks run again in its recompute)
    share = lambda n: stage["overhead_microbatch_ms"] * n / raw["engine"]["tensors_total"]  # noqa: E731
    host = gpu = serial = engine_mb = 0.0
    pieces, ordered = [], []
    fits = raw["other"]["first"]["vtp"]["1"]["fits"]
    pieces.append(([(fits["fwd"], 1), (fits["bwd"], 1)], share(tensors["first"]), False))
    for i in range(spec.num_layers):
        fits = raw["layer_types"][spec.layer(i).name]["tp"]["1"]["fits"]
        kinds = [("fwd", 1), ("bwd", 1)]
        if i < ckpt:
            kinds += [("bwd_ckpt", 1), ("bwd", -1)]      # recompute: the checkpointed backward's excess
        pieces.append(([(fits[k], sign) for k, sign in kinds], share(tensors["layers"][spec.layer(i).name]), i < ckpt))
    fits = raw["other"]["last"]["vtp"]["1"]["fits"]
    pieces.append(([(fits["fwd"], 1), (fits["bwd"], 1)], share(tensors["last"]), False))
    for piece, hooks, checkpointed in pieces:
        h = sum(sign * fit_ms(f, b)[0] for f, sign in piece)
        g = sum(sign * fit_ms(f, b)[1] for f, sign in piece)
        if len(piece) == 4:              # recompute, each side clipped at 0 as a difference of fits
            h0, g0 = (sum(s * fit_ms(f, b)[j] for f, s in piece[:2]) for j in (0, 1))
            h = h0 + max(0.0, h - h0)
            g = g0 + max(0.0, g - g0)
        fwd_hooks = 0.5 * hooks if zero == 3 else 0.0
        hooks *= 1.5 if zero == 3 and checkpointed else 1.0
        host, gpu, engine_mb = host + h, gpu + g, engine_mb + hooks
        hf, gf = fit_ms(piece[0][0], b)
        ordered.append((hf + fwd_hooks, gf, h - hf + hooks - fwd_hooks, g - gf))
        # serial: each measured phase at the larger of its two sides
        phases = [max(*fit_ms(f, b)) for f, _ in piece[:2]]
        if len(piece) == 4:
            phases.append(max(0.0, max(*fit_ms(piece[2][0], b)) - max(*fit_ms(piece[1][0], b))))
        serial += sum(phases)
    optimizer = spec.params_total(1) * OPTIMIZER_BYTES_PER_PARAM / (hw.mem_bw_gbps * 1e9)
    step = max(0.0, stage["step_ms"] / 1e3 - optimizer) + optimizer
    compute = _simulate(ordered, chunks) if overlap else chunks * (serial + engine_mb)
    return compute / 1e3 + step, "host" if host + engine_mb > gpu else "GPU"


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


def test_gpu_time_lost_to_the_host_is_not_made_up_later():
    from autotune.cost_model import ordered_overlap

    # forward: a launch-bound piece (host 3, GPU 1) then a GPU-bound one (host 1, GPU 3); backwards free
    slow_host = Cost(host_s=3.0, gpu_s=1.0, host_fwd_s=3.0, gpu_fwd_s=1.0)
    slow_gpu = Cost(host_s=1.0, gpu_s=3.0, host_fwd_s=1.0, gpu_fwd_s=3.0)
    # host ends the first at 3 (GPU done at 3), the second queued 3..4, run 3..6: 6 where the sums give 4
    assert ordered_overlap([slow_host, slow_gpu], 1) == pytest.approx((6.0, 4.0))
    # the other order: the GPU-bound piece runs 0..3 while the host queues the launch-bound one 1..4, whose
    # kernels run as they come: done at the host's last launch, 4, the larger sum
    assert ordered_overlap([slow_gpu, slow_host], 1) == pytest.approx((4.0, 4.0))
    # micro-batches repeat: per step values over m = 5, the last simulated increment stands for the rest
    both = [Cost(host_s=5 * 3.0, gpu_s=5 * 1.0, host_fwd_s=5 * 3.0, gpu_fwd_s=5 * 1.0),
            Cost(host_s=5 * 1.0, gpu_s=5 * 3.0, host_fwd_s=5 * 1.0, gpu_fwd_s=5 * 3.0)]
    gpu, host = ordered_overlap(both, 5)
    assert host == pytest.approx(20.0) and gpu == pytest.approx(5 * 4.0 + 2.0)   # 6, then 4 a micro-batch
    assert ordered_overlap([Cost(compute_s=1.0)], 1) is None
