"""Per-layer TP runtime pieces (backends/megatron/layerwise.py) on their own.

Loss/gradient-norm parity of whole per-layer plans against single-process HF is checked in
tests/test_runtime_plans.py (BERT) and tests/test_runtime_swin.py (Swin); here: the layout
arithmetic, the DeepSpeed grid and gradient-norm owners against brute force, the data shares, the
plan checks, the redistribution function alone on 4 ranks, and train.py running a per-layer plan.
"""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from autotune.plan import Plan, PlanError
from backends.data import fine_share, split_micro
from backends.megatron.groups import check_executable
from backends.megatron.layerwise import Layout, LayerwiseLayout, needs_layerwise, shard_owner, zero_group_size
from tests.dist_launcher import REPO, run_ranks


def _plan(tps, flags=None, vtp=1, pp=1, world=4, zero=0, chunks=1, bsz=8) -> Plan:
    plan = Plan.uniform(num_layers=len(tps), world_size=world, pp=pp, tp=min(tps), zero_stage=zero, chunks=chunks,
                        global_bsz=bsz, vtp=vtp, precision="fp32")
    plan.tp_sizes_enc = list(tps)
    plan.tp_consecutive_flags = list(flags or [1] * len(tps))
    return plan.validate()


def test_layout_groups_by_hand():
    B = 8
    cons, strided = Layout(2, True), Layout(2, False)
    assert cons.members(5, B) == [4, 5] and cons.position(5, B) == 1 and cons.replicas(5, B) == [1, 3, 5, 7]
    assert strided.members(5, B) == [1, 5] and strided.position(5, B) == 1 and strided.replicas(5, B) == [4, 5, 6, 7]
    assert Layout(4, False).members(2, B) == [0, 2, 4, 6]
    assert Layout.make(1, False, B) == Layout(1, True) and Layout.make(8, False, B) == Layout(8, True)
    for layout in (cons, strided, Layout(4, True), Layout(4, False)):      # groups partition the stage
        assert sorted(itertools.chain(*layout.groups(B))) == list(range(B))
        assert sorted(itertools.chain(*layout.dp_groups(B))) == list(range(B))


@pytest.mark.parametrize("tps,flags,vtp,dp", [
    ([1, 2, 4, 2], None, 1, 1),                    # TP 4 consecutive: D = B / 4
    ([2, 2, 1, 1], [1, 0, 1, 1], 2, 1),            # consecutive and strided TP 2: D is one rank
    ([2, 2, 1, 1], [0, 0, 1, 1], 1, 2),            # strided only: D = B / 2 (ranks {0,1} and {2,3})
    ([2, 1, 1, 2], None, 2, 2),
    ([1, 1, 1, 1], None, 2, 2),                    # uniform layers, vtp != tp
])
def test_grid_groups_hold_identical_shards_and_norm_counts_each_shard_once(tps, flags, vtp, dp):
    plan = _plan(tps, flags, vtp)
    assert needs_layerwise(plan)
    lw = LayerwiseLayout.from_plan(plan)
    B = lw.B
    assert lw.zero_dp == dp
    layouts = lw.all_layouts
    for j, k in itertools.product(range(B), repeat=2):
        same = all(x.position(j, B) == x.position(k, B) for x in layouts)
        if lw.data_index(j) == lw.data_index(k) and lw.model_index(j) == lw.model_index(k):
            assert j == k
        if lw.model_index(j) == lw.model_index(k):     # same DeepSpeed data-parallel group
            assert same, (j, k)
    # DeepSpeed sums over the ranks with one 'data' index; rank 0 of that group counts everything
    for d in range(dp):
        mates = [j for j in range(B) if lw.data_index(j) == d]
        for layout in layouts + [None]:
            counted = [j for j in mates if shard_owner(lw, layout, j)]
            keys = [0 if layout is None else layout.position(j, B) for j in counted]
            held = {0 if layout is None else layout.position(j, B) for j in mates}
            assert sorted(keys) == sorted(held), (layout, counted)          # every shard once
            assert mates[0] in counted                                     # consistent with rank 0 counting all


def test_fine_shares_cover_each_micro_batch_once_per_group():
    plan = _plan([1, 2, 4, 2], vtp=2, chunks=2, bsz=16)
    lw = LayerwiseLayout.from_plan(plan)
    batch = {"x": torch.arange(16)}
    for mb in split_micro(batch, plan.chunks):
        groups = {tuple(lw.vocab.members(j, lw.B)) for j in range(lw.B)}
        got = sorted(torch.cat([fine_share(mb, list(g), lw.B)["x"] for g in groups]).tolist())
        assert got == mb["x"].tolist()
    assert fine_share({"x": torch.arange(8)}, [1, 3], 4)["x"].tolist() == [2, 3, 6, 7]


def test_layerwise_plan_checks():
    check_executable(_plan([1, 2, 4, 2]))
    with pytest.raises(PlanError, match="zero_stage 2"):
        check_executable(_plan([1, 2, 4, 2], zero=3))
    with pytest.raises(PlanError, match="multiple of chunks\\*4=8"):     # global_bsz fits dp = 4 / min TP 2
        check_executable(_plan([2, 2, 4, 2], vtp=2, chunks=2, bsz=4))
    assert not needs_layerwise(_plan([2, 2, 2, 2], vtp=2))


@pytest.mark.distributed
def test_redistribution_forward_and_backward_by_hand():
    """tests/dist_layerwise_redistribute.py: every layout change against hand-made expectations."""
    run_ranks(REPO / "tests" / "dist_layerwise_redistribute.py", 4, timeout=300)


@pytest.mark.distributed
def test_train_py_runs_a_per_layer_plan_and_exports_it(tmp_path):
    """train.py with a plan.json of per-layer TP (Swin: TP 1 | strided 2 | 4 | 2, vtp 1, ZeRO 1, 2 chunks)
    on 4 ranks, exported with --export-hf: the weights equal a single-process HF model trained the same
    steps (tests/test_export_hf.py's reference), so every layer's shards -- the relative-position bias
    tables included -- are gathered over that layer's own group."""
    from tests.test_export_hf import GLOBAL_BATCH, LR, SEED, STEPS, _load_export, _reference

    plan = _plan([1, 2, 4, 2], flags=[1, 0, 1, 1], vtp=1, zero=1, chunks=2, bsz=GLOBAL_BATCH)
    plan.model = {"name": "swin-test"}
    path, out, metrics = tmp_path / "plan.json", tmp_path / "hf", tmp_path / "m.jsonl"
    plan.save(str(path))
    assert json.loads(path.read_text())["tp_sizes_enc"] == "1,2,4,2"
    run_ranks(REPO / "train.py", 4, ["--model", "swin-test", "--galvatron-plan", str(path), "--steps", str(STEPS),
                                     "--lr", str(LR), "--seed", str(SEED), "--metrics-file", str(metrics),
                                     "--export-hf", str(out)], timeout=300)
    steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if not r.get("summary")]
    assert [s["step"] for s in steps] == list(range(STEPS)) and all(s["grad_norm"] > 0 for s in steps)
    exported = _load_export(out, "swin-test").state_dict()
    init, ref = _reference("swin-test")
    assert set(exported) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("layers,vtp,expect", [
    ([(1, True), (2, True), (4, True), (2, True)], 1, 1),     # B / max TP = 4 / 4
    ([(2, True), (1, True)], 1, 2),
    ([(2, False), (2, False)], 2, 2),                        # vocab takes the layers' strided layout
    ([(2, True), (2, False)], 2, 1),                         # both kinds of layout: one rank
    ([(1, True)], 4, 1),
])
def test_zero_group_size(layers, vtp, expect):
    assert zero_group_size(layers, vtp, 4) == expect


def test_cost_model_zero_divisor_for_layerwise_plans():
    """bf16 ZeRO-1 per rank and parameter: param 2 + fp32 grad 4 + (master + Adam 12) / ZeRO ranks.
    A TP-1 layer of 10M parameters in a stage of 4 ranks: 10M x (6 + 12/4) = 90 MB when ZeRO shards
    over its 4 replicas, 10M x (6 + 12/2) = 120 MB over the 2 ranks of a layer-wise plan's group
    (zero_dp = 2), 10M x 18 over 1; a TP-4 layer (one replica) is not sharded either way: 2.5M x 18.
    The optimizer step touches the rank's ZeRO partition: 10M / 4, / 2, / 1 and 2.5M parameters."""
    from autotune.cost_model import CostModel, LayerStrategy, OPTIMIZER_BYTES_PER_PARAM, Setting
    from tests import synthetic as syn

    lt = syn.layer(params=10_000_000, heads=8)
    cm = CostModel(syn.spec([lt], [0] * 4), syn.hardware(gpus=4))      # memory bandwidth 1000 GB/s
    for zero_dp, tp, expect, local in [(0, 1, 10e6 * 9, 2.5e6), (2, 1, 10e6 * 12, 5e6), (1, 1, 10e6 * 18, 10e6),
                                       (2, 4, 2.5e6 * 18, 2.5e6)]:
        c = cm.layer_cost(lt, LayerStrategy(tp), Setting(4, 1, 1, 1, 8, zero_dp=zero_dp), 0)
        assert c.states_bytes == pytest.approx(expect), (zero_dp, tp)
        assert c.optimizer_s == pytest.approx(local * OPTIMIZER_BYTES_PER_PARAM / 1e12), (zero_dp, tp)


def test_search_prices_a_layerwise_zero_plan_with_deepspeeds_group():
    """predict() of a per-layer plan under ZeRO-1 charges optimizer states over the ranks identical in
    every layer: with TP 4 somewhere, a TP-1 layer's states are not sharded at all."""
    from autotune.search import Searcher
    from tests import synthetic as syn

    lt = syn.layer(params=10_000_000, heads=8)
    searcher = Searcher(syn.spec([lt], [0] * 4), syn.hardware(gpus=4), 80.0)
    mixed = _plan([1, 1, 1, 4], vtp=1, zero=1)
    flat = _plan([1, 1, 1, 1], vtp=1, zero=1)
    mem = lambda plan: searcher.predict(plan).stage_memory[0]["model_states_mb"] * 1024 * 1024  # noqa: E731
    # three TP-1 layers: 9 -> 18 bytes per parameter; the TP-4 layer (one replica): 2.5M x 18 in both
    assert mem(mixed) == pytest.approx(3 * 10e6 * 18 + 2.5e6 * 18)
    assert mem(flat) == pytest.approx(4 * 10e6 * 9)


@pytest.mark.parametrize("seed", range(8))
def test_layerwise_search_plans_are_executable_and_fit(seed):
    """Plans of the (default) layer-wise space pass the runtime's checks, and the plan as the runtime
    runs it (ZeRO over DeepSpeed's one data-parallel group) still fits the budget."""
    import random

    from autotune.search import Searcher, to_plan
    from tests.test_search import MB, random_case

    spec, hw, mem, bsz = random_case(random.Random(seed))
    s = Searcher(spec, hw, mem, space="layerwise")
    for ev in s.run([bsz])[:10]:
        plan = to_plan(ev, spec, hw, mem)
        plan.validate(world_size=hw.world_size, num_layers=spec.num_layers)
        check_executable(plan)
        assert s.predict(plan).peak_mb * MB <= s.budget * (1 + 1e-9)
        assert ev.peak_mb == pytest.approx(s.predict(plan).peak_mb)


def test_layout_change_inside_a_t5_stack_is_refused():
    from backends.megatron.layerwise import check_sequence
    from model_zoo.registry import load_hf_config
    from model_zoo.runtime import get_adapter

    adapter = get_adapter("t5")
    seq = adapter.layer_sequence(adapter.build_model(load_hf_config("t5-test"), "seq2seq"), "seq2seq")
    assert seq.meta["same_tp_layout"] == [(0, 2), (2, 4)]
    check_sequence(seq, LayerwiseLayout.from_plan(_plan([4, 4, 1, 1], vtp=2)))
    with pytest.raises(PlanError, match="layers 2-3 pass tensors split by attention head"):
        check_sequence(seq, LayerwiseLayout.from_plan(_plan([4, 4, 1, 2])))
