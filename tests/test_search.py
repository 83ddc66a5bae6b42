"""Search: a golden case worked out by hand, and properties over random models and clusters."""
import random

import pytest

from autotune.cost_model import MB, CostModel, Setting
from autotune.dp import solve_stage
from autotune.search import Searcher, balanced_split, to_plan
from backends.deepspeed.config import make_ds_config
from tests import synthetic as syn


def gpu_memory_for_budget(budget_mb: float) -> float:
    """Inverse of CostModel.budget_bytes: GB of device memory leaving `budget_mb` for the allocator."""
    from autotune.cost_model import FRAMEWORK_OVERHEAD_BYTES, FRAGMENTATION_RESERVE
    return (budget_mb * MB + FRAMEWORK_OVERHEAD_BYTES) / (1 - FRAGMENTATION_RESERVE) / 1024 ** 3


def test_golden_checkpoint_choice():
    """1 GPU, layers A B A B; A is 3x cheaper to recompute than B.

    Hand computation (100 TFLOP/s x 0.5 = 5e13 FLOP/s, one sample):
      A: fwd 1e12/5e13 = 0.02 s, bwd 0.04, recompute 0.02;  B: fwd 0.06, bwd 0.12, recompute 0.06.
      Memory: full layer 1000 MB kept, checkpointed 10 MB. Backward runs B3, A2, B1, A0; while a layer
      runs it, the activations of the layers after it are freed and it adds its workspace (unmeasured:
      one full layer, 1000 MB), a checkpointed one also its recomputed 1000 MB. Peak = max over layers.
      Budget 3500: 4 full = 5000 (no), 3 full + 1 ckpt = 4010 (no), checkpoint the two A layers:
      stored 2020; B3: 2020 + 1000 = 3020, A2: 1020 + 2000 = 3020 -> 3020 (yes); the cheapest recompute.
      Step = A: 2 x (0.02 + 0.04 + 0.02) + B: 2 x (0.06 + 0.12) = 0.52 s.
    """
    a = syn.layer("A", 2, params=0, fwd_flops=1e12, act_mb=1000, ckpt_mb=10)
    b = syn.layer("B", 2, params=0, fwd_flops=3e12, act_mb=1000, ckpt_mb=10)
    spec = syn.spec([a, b], [0, 1, 0, 1])
    hw = syn.hardware(gpus=1)
    s = Searcher(spec, hw, gpu_memory_for_budget(3500))
    res = s.run([1])
    best = res[0]
    assert [int(x.checkpoint) for x in best.strategies] == [1, 0, 1, 0]
    assert best.step_time_s == pytest.approx(0.52)
    assert best.stage_memory[0]["total_mb"] == pytest.approx(3020, abs=0.5)
    # With 4100 MB one checkpointed A is enough (stored 3010, B3 at 4010): step 0.50 s
    best2 = Searcher(spec, hw, gpu_memory_for_budget(4100)).run([1])[0]
    assert sum(x.checkpoint for x in best2.strategies) == 1
    assert best2.step_time_s == pytest.approx(0.50)
    # 2500 MB: three checkpointed, and the one kept whole must be the last B: [1,1,1,0] stores 1030 and
    # peaks at 2030 (B3: 1030 + 1000; A2: 30 + 2000), while [1,0,1,1] would peak at 1030 + 2000 = 3030.
    best3 = Searcher(spec, hw, gpu_memory_for_budget(2500)).run([1])[0]
    assert [int(x.checkpoint) for x in best3.strategies] == [1, 1, 1, 0]
    assert best3.step_time_s == pytest.approx(0.58)
    assert best3.stage_memory[0]["total_mb"] == pytest.approx(2030, abs=0.5)
    # All four checkpointed peak at 40 + 2000 = 2040 (B3 recomputes with everything stored): never better
    # than [1,1,1,0]; below 2030 MB nothing fits.
    assert Searcher(spec, hw, gpu_memory_for_budget(2000)).run([1]) == []


def test_golden_data_parallel():
    """2 GPUs, compute-bound layers of 1e6 params, batch 2, perfect overlap (coefficient 1), no latency.

    dp=2 gives each GPU one sample: 4 layers x (fwd 0.02 + bwd 0.04) = 0.24 s of compute.
      ZeRO-0: + all-reduce of 4 x 2e6 B bf16 grads, 2 x 1/2 x 2e6 / 1e11 = 2e-5 s each, after backward,
              + Adam over 4e6 local params x 30 B / 1e12 B/s = 1.2e-4 s          -> 0.2402 s
      ZeRO-3: gathers and reduce-scatters hide under compute; Adam over 2e6 params -> 0.24006 s (best)
    tp=2 adds 4 all-reduces per layer; pp=2 with one micro-batch runs the stages one after the other.
    """
    lt = syn.layer(params=1_000_000, fwd_flops=1e12, act_mb=10, ckpt_mb=1)
    spec = syn.spec([lt], [0] * 4)
    hw = syn.hardware(gpus=2)
    best = Searcher(spec, hw, 80).run([2])[0]
    assert (best.cand.pp, best.cand.tp, best.cand.zero) == (1, 1, 3)
    assert best.step_time_s == pytest.approx(0.24 + 2e6 * 30 / 1e12, rel=1e-9)
    ddp = Searcher(spec, hw, 80, space="dp").run([2])[0]
    assert ddp.step_time_s == pytest.approx(0.24 + 4 * 2e-5 + 4e6 * 30 / 1e12, rel=1e-9)


def test_dp_solver_matches_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        n, S = rng.randint(1, 6), rng.randint(1, 3)
        import itertools
        import numpy as np
        cost = np.array([[rng.uniform(0, 10) for _ in range(S)] for _ in range(n)])
        mem = np.array([[rng.randint(0, 8) for _ in range(S)] for _ in range(n)])
        V = rng.randint(0, 30)
        best = None
        for combo in itertools.product(range(S), repeat=n):
            m = sum(mem[i, c] for i, c in enumerate(combo))
            t = sum(cost[i, c] for i, c in enumerate(combo))
            if m <= V and (best is None or t < best - 1e-12):
                best = t
        res = solve_stage(cost, mem, V)
        if best is None:
            assert res is None
        else:
            assert res is not None and res.time_s == pytest.approx(best)
            assert sum(mem[i, c] for i, c in enumerate(res.choice)) <= V


def test_balanced_split_is_optimal_minmax():
    import itertools
    rng = random.Random(1)
    for _ in range(40):
        n, p = rng.randint(2, 8), rng.randint(1, 4)
        if p > n:
            continue
        w = [rng.uniform(0, 5) for _ in range(n)]
        head, tail = rng.uniform(0, 3), rng.uniform(0, 3)
        got = balanced_split(w, [0.0] * n, p, head, tail)
        assert sum(got) == n and len(got) == p and min(got) >= 1

        def worst(sizes):
            out, i = [], 0
            for k, s in enumerate(sizes):
                out.append(sum(w[i:i + s]) + (head if k == 0 else 0) + (tail if k == p - 1 else 0))
                i += s
            return max(out)
        brute = min(worst([b - a for a, b in zip((0,) + cuts, cuts + (n,))])
                    for cuts in itertools.combinations(range(1, n), p - 1))
        assert worst(got) == pytest.approx(brute, rel=1e-6)


def random_case(rng):
    heads = rng.choice([4, 8, 12, 16])
    types = [syn.layer(f"t{k}", 0, params=rng.randint(10 ** 5, 5 * 10 ** 7), fwd_flops=rng.uniform(1e9, 1e12),
                       act_mb=rng.uniform(1, 400), ckpt_mb=rng.uniform(0.1, 5), heads=heads,
                       boundary_bytes=rng.randint(10 ** 4, 10 ** 6)) for k in range(rng.randint(1, 3))]
    order = [rng.randrange(len(types)) for _ in range(rng.randint(2, 24))]
    oth = syn.other(params_first=rng.randint(0, 10 ** 7), params_last=rng.randint(0, 10 ** 7), flops=1e9,
                    act=rng.randint(0, 50 * MB))
    world = rng.choice([1, 2, 4, 8, 16, 32])
    nodes = 1 if world <= 8 else world // 8
    hw = syn.hardware(gpus=world, nodes=nodes, overlap=rng.uniform(1.0, 1.3), latency_us=10)
    return syn.spec(types, order, oth), hw, rng.choice([8, 16, 24, 40, 80]), rng.choice([world, 4 * world, 64])


@pytest.mark.parametrize("seed", range(12))
def test_properties_random(seed):
    """Every plan factors the world, fits its budget by the cost model, and obeys the backend's rules."""
    rng = random.Random(seed)
    spec, hw, mem, bsz = random_case(rng)
    s = Searcher(spec, hw, mem)
    results = s.run([bsz])
    for ev in results[:10]:
        c = ev.cand
        W = hw.world_size
        assert W % (c.pp * c.tp) == 0
        assert c.pp == 1 or c.zero <= 1
        assert all(lt.heads % c.tp == 0 for lt in spec.layer_types)
        assert sum(ev.pp_division) == spec.num_layers and min(ev.pp_division) >= 1
        assert all(m["total_mb"] * MB <= s.budget * (1 + 1e-9) for m in ev.stage_memory)
        # recompute each stage's memory independently from the cost model's per-layer terms
        setting = Setting(W, c.pp, c.zero, c.chunks, c.global_bsz, spec.precision, vtp=c.tp)
        cm = CostModel(spec, hw)
        start = 0
        for k, n in enumerate(ev.pp_division):
            layer_mem = sum(cm.layer_cost(spec.layer(i), ev.strategies[i], setting, k).states_bytes +
                            cm.layer_cost(spec.layer(i), ev.strategies[i], setting, k).act_bytes
                            for i in range(start, start + n))
            start += n
            assert layer_mem <= ev.stage_memory[k]["total_mb"] * MB + 1
        plan = to_plan(ev, spec, hw, mem)
        plan.validate(world_size=W, num_layers=spec.num_layers)
        ds = make_ds_config(plan)
        assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * (W // c.pp // c.tp) \
            == ds["train_batch_size"]


def test_no_plan_when_memory_too_small():
    lt = syn.layer(params=10 ** 9, act_mb=100)
    spec = syn.spec([lt], [0] * 4)
    assert Searcher(spec, syn.hardware(gpus=2), 2).run([2]) == []


def test_dp_solver_with_switch_costs_matches_brute_force():
    import itertools

    import numpy as np
    rng = random.Random(2)
    for _ in range(30):
        n, S = rng.randint(1, 5), rng.randint(1, 3)
        cost = np.array([[rng.uniform(0, 10) for _ in range(S)] for _ in range(n)])
        mem = np.array([[rng.randint(0, 8) for _ in range(S)] for _ in range(n)])
        switch = np.array([[[rng.uniform(0, 3) for _ in range(S)] for _ in range(S)] for _ in range(n)])
        switch[0] = 0.0
        V = rng.randint(0, 30)
        best = None
        for combo in itertools.product(range(S), repeat=n):
            m = sum(mem[i, c] for i, c in enumerate(combo))
            t = sum(cost[i, c] for i, c in enumerate(combo)) + sum(switch[i, combo[i - 1], combo[i]]
                                                                  for i in range(1, n))
            if m <= V and (best is None or t < best - 1e-12):
                best = t
        res = solve_stage(cost, mem, V, switch)
        if best is None:
            assert res is None
        else:
            assert res is not None and res.time_s == pytest.approx(best)


def test_predict_given_plan_by_hand():
    """A B A B with checkpoint 1,1,0,0 (see the golden case): 0.08 + 0.24 + 0.06 + 0.18 = 0.56 s."""
    from autotune.plan import Plan
    a = syn.layer("A", 2, params=0, fwd_flops=1e12, act_mb=1000, ckpt_mb=10)
    b = syn.layer("B", 2, params=0, fwd_flops=3e12, act_mb=1000, ckpt_mb=10)
    spec = syn.spec([a, b], [0, 1, 0, 1])
    plan = Plan.uniform(num_layers=4, world_size=1, global_bsz=1, checkpoint=[1, 1, 0, 0])
    ev = Searcher(spec, syn.hardware(gpus=1), 80).predict(plan)
    assert ev.step_time_s == pytest.approx(0.56)
    assert ev.stage_memory[0]["total_mb"] == pytest.approx(10 + 10 + 1000 + 1000 + 1000)


def test_memory_check_refuses_and_suggests():
    from autotune.memory_check import check_plan_memory
    from autotune.plan import Plan
    lt = syn.layer(params=0, act_mb=1000, ckpt_mb=10)
    spec = syn.spec([lt], [0] * 4)
    plan = Plan.uniform(num_layers=4, world_size=1, global_bsz=4)
    # micro-batch 4: 4 x 4 x 1000 MB + 4000 MB transient = 20000 MB
    v = check_plan_memory(plan, spec, gpu_memory_for_budget(12000))
    assert not v.ok and v.stage_peak_mb[0] == pytest.approx(20000)
    msg = v.message()
    assert "--chunks 2" in msg and "--checkpoint 1" in msg and "--force" in msg
    assert check_plan_memory(plan, spec, gpu_memory_for_budget(20001)).ok


@pytest.mark.parametrize("seed", range(6))
def test_branch_and_bound_keeps_best_and_baselines(seed):
    """Pruning must not change the best plan, nor the best plan of any restricted space."""
    from autotune.search import baseline_rows
    rng = random.Random(100 + seed)
    spec, hw, mem, bsz = random_case(rng)
    full = Searcher(spec, hw, mem).run([bsz], prune=False)
    pruned = Searcher(spec, hw, mem).run([bsz])
    assert bool(full) == bool(pruned)
    if full:
        assert pruned[0].step_time_s == pytest.approx(full[0].step_time_s)
        W = hw.world_size
        assert [r["samples_per_s"] for r in baseline_rows(pruned, pruned[0], W)] == \
            [r["samples_per_s"] for r in baseline_rows(full, full[0], W)]


def test_grouped_dp_matches_brute_force():
    """Switch costs by layout group (checkpointing free of redistribution), as layer-wise TP uses."""
    import itertools

    import numpy as np
    rng = random.Random(3)
    for _ in range(30):
        n, G = rng.randint(1, 5), rng.randint(1, 3)
        groups = np.array([g for g in range(G) for _ in range(2)])   # each layout: plain and checkpointed
        S = len(groups)
        cost = np.array([[rng.uniform(0, 10) for _ in range(S)] for _ in range(n)])
        mem = np.array([[rng.randint(0, 8) for _ in range(S)] for _ in range(n)])
        sw = np.array([[[0.0 if a == b else rng.uniform(0, 3) for b in range(G)] for a in range(G)] for _ in range(n)])
        V = rng.randint(0, 30)
        best = None
        for combo in itertools.product(range(S), repeat=n):
            m = sum(mem[i, c] for i, c in enumerate(combo))
            t = sum(cost[i, c] for i, c in enumerate(combo)) + sum(sw[i, groups[combo[i - 1]], groups[combo[i]]]
                                                                  for i in range(1, n))
            if m <= V and (best is None or t < best - 1e-12):
                best = t
        res = solve_stage(cost, mem, V, sw, groups)
        if best is None:
            assert res is None
        else:
            assert res is not None and res.time_s == pytest.approx(best)
            t = sum(cost[i, c] for i, c in enumerate(res.choice)) + sum(
                sw[i, groups[res.choice[i - 1]], groups[res.choice[i]]] for i in range(1, n))
            assert t == pytest.approx(res.time_s)
            assert sum(mem[i, c] for i, c in enumerate(res.choice)) <= V


def test_alternatives_skip_plans_that_are_the_same_layout():
    """A layer-wise plan that gives every layer TP 1 (vtp 1) is the uniform TP-1 plan: listed once; other
    chunk counts or checkpointing of one layout are not new either; a new batch size is."""
    from autotune.cost_model import LayerStrategy
    from autotune.search import Candidate, Evaluated, distinct_alternatives

    def ev(cand, sps, tps, ckpt=False):
        return Evaluated(cand, 1.0 / sps, sps, [len(tps)], [LayerStrategy(t, True, ckpt) for t in tps], [], [])

    best = ev(Candidate(1, 1, True, 1, 1, 64), 10.0, [1, 1])
    same_layerwise = ev(Candidate(1, 0, True, 1, 1, 64, vtp=1), 9.0, [1, 1])
    same_more_chunks = ev(Candidate(1, 1, True, 1, 2, 64), 8.0, [1, 1], ckpt=True)
    mixed = ev(Candidate(1, 0, True, 1, 1, 64, vtp=1), 7.0, [1, 2])
    smaller_batch = ev(Candidate(1, 1, True, 1, 1, 32), 6.0, [1, 1])
    alts = distinct_alternatives([best, same_layerwise, same_more_chunks, mixed, smaller_batch], 5)
    assert alts == [mixed, smaller_batch]
