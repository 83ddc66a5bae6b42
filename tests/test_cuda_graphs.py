"""train.py --cuda-graphs (backends/deepspeed/graphs.py) on CPU: the plans it refuses, the gradient-copy hook
against a static gradient buffer (pytorch/pytorch#181723), and the engine's record / capture / replay path with
a stand-in for CUDA's capture, against the eager engine's losses."""
from __future__ import annotations

import pytest
import torch

from autotune.plan import Plan
from backends.deepspeed import graphs
from tests.dist_launcher import train_py


def _plan(**kw) -> Plan:
    kw.setdefault("checkpoint", 0)
    return Plan.uniform(num_layers=4, world_size=kw.pop("world_size", 1), **kw)


@pytest.mark.parametrize("kw, compile_mode, cuda, needle", [
    ({}, None, False, "needs a CUDA device"),
    ({}, "default", True, "exclude each other"),
    ({"pp": 2, "world_size": 2}, None, True, "needs pp = 1"),
    ({"zero_stage": 3}, None, True, "ZeRO-3"),
    ({"tp": 2, "world_size": 2}, None, True, "TP 1 in every layer"),
    ({"world_size": 2, "global_bsz": 8}, None, True, "dp = 2"),
])
def test_refused_plans_name_the_reason(kw, compile_mode, cuda, needle):
    assert needle in graphs.graph_refusal(_plan(**kw), compile_mode, cuda)


def test_allowed_plans():
    # every layer checkpointed is allowed too: nothing is graphed (build_engine makes no LayerGraphs)
    for kw in ({}, {"zero_stage": 2, "chunks": 2, "global_bsz": 8}, {"checkpoint": [1, 1, 1, 0]}, {"checkpoint": 1}):
        assert graphs.graph_refusal(_plan(**kw), None, True) is None


def test_train_py_refuses_on_cpu_with_exit_2(tmp_path):
    r = train_py("--model", "bert-test", "--steps", "1", "--cuda-graphs", "--metrics-file", "m.jsonl",
                 cwd=tmp_path, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert [x for x in r.stderr.splitlines() if x.startswith("error:")] == [
        "error: --cuda-graphs needs a CUDA device (CUDA graphs); leave it off on the CPU"]
    assert not (tmp_path / "m.jsonl").exists()


class StaticBufferGrad(torch.autograd.Function):
    """d(sum(w * x))/dw written into one static buffer and handed back detached, as a graphed backward does."""

    buffer: torch.Tensor

    @staticmethod
    def forward(ctx, w, x):
        ctx.save_for_backward(x)
        return (w * x).sum()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        StaticBufferGrad.buffer.copy_(g * x)
        return StaticBufferGrad.buffer.detach(), None


def _accumulated(hooked: bool) -> torch.Tensor:
    w = torch.nn.Parameter(torch.zeros(3))
    StaticBufferGrad.buffer = torch.zeros(3)
    m = torch.nn.Module()
    m.w = w
    handles = graphs.copy_grads_out([m]) if hooked else []
    for x in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])):
        StaticBufferGrad.apply(w, x).backward()
    for h in handles:
        h.remove()
    return w.grad


def test_gradient_copy_hook_makes_accumulation_add_up():
    # Without the hook autograd keeps the buffer as .grad and the second pass overwrites it: 2 x the second
    # gradient. With it: the sum of both.
    assert torch.equal(_accumulated(hooked=False), torch.tensor([20.0, 40.0, 60.0]))
    assert torch.equal(_accumulated(hooked=True), torch.tensor([11.0, 22.0, 33.0]))


def _make_graphed_stand_in(calls: list):
    """torch.cuda.make_graphed_callables without CUDA: the check its capture makes (autograd.grad of each callable's
    outputs that need a gradient over its sample inputs and parameters that need one, with its allow_unused_input:
    a T5 entry hands on a tensor it does not use) and then each entry's eager forward as its 'graph', counting calls."""
    def make(callables, samples, allow_unused_input=False, **_):
        out = []
        for k, (fn, xs) in enumerate(zip(callables, samples)):
            ys = [y for y in fn(*xs) if y.requires_grad]
            wrt = [x for x in xs if x.requires_grad] + [p for p in fn.parameters() if p.requires_grad]
            torch.autograd.grad(ys, wrt, grad_outputs=[torch.ones_like(y) for y in ys], allow_unused=allow_unused_input)

            def run(*tensors, _e=fn.entry, _computed=fn.computed, _k=k):     # the entry's eager path (its
                calls.append(_k)                                            # forward would replay this)
                y = _e.forward_fn(_e.inner, tensors) if _e.forward_fn else _e.inner(tensors)
                y = y if isinstance(y, tuple) else (y,)
                return tuple(y[j] for j in _computed)
            out.append(run)
        return out
    return make


def _losses(monkeypatch, model: str, cuda_graphs: bool, calls: list) -> tuple[list[float], str | None]:
    """A test preset's losses over 3 steps of 2 micro-batches (first layer checkpointed, fp32, ZeRO-1), eager or
    under --cuda-graphs with the stand-in capture; and the graphs' summary."""
    import backends.deepspeed.engine as engine_mod
    from backends.data import SyntheticData
    from backends.megatron.groups import build_parallel_groups, destroy_parallel_groups
    from model_zoo.registry import PRESETS, load_hf_config
    from model_zoo.runtime import get_adapter

    if cuda_graphs:
        monkeypatch.setattr(engine_mod, "graph_refusal", lambda *a: None)
        monkeypatch.setattr(engine_mod, "training_stream", lambda: None)      # no side stream on the CPU
        monkeypatch.setattr(torch.cuda, "make_graphed_callables", _make_graphed_stand_in(calls))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    preset = PRESETS[model]
    adapter, config = get_adapter(preset.family), load_hf_config(model)
    n = adapter.num_layers(config)
    plan = Plan.uniform(num_layers=n, world_size=1, global_bsz=4, chunks=2, zero_stage=1, precision="fp32",
                        checkpoint=[1] + [0] * (n - 1))
    groups = build_parallel_groups(plan)
    torch.manual_seed(0)
    net = adapter.build_model(config, preset.task)
    net = adapter.build_model(config, preset.task, net.state_dict())
    trainer = engine_mod.build_engine(plan, groups, adapter.layer_sequence(net, preset.task), lr=1e-3,
                                      cuda_graphs=cuda_graphs)
    data = SyntheticData(adapter, config, preset.task, plan, 0, 1)
    losses = [trainer.train_step(data.micro_batches(s)).loss for s in range(3)]
    summary = trainer.graphs.summary() if trainer.graphs else None
    trainer.destroy()
    destroy_parallel_groups()
    return losses, summary


@pytest.mark.parametrize("model", ["bert-test", "t5-test", "vit-test", "swin-test"])
def test_engine_records_then_replays_plain_layers(world_of_one, monkeypatch, model):
    """BERT hands its mask on unchanged, T5's last decoder layer returns one bare tensor: the replayed entries must give
    back exactly what the eager ones did."""
    ref, none = _losses(monkeypatch, model, False, [])
    calls: list = []
    got, summary = _losses(monkeypatch, model, True, calls)
    assert none is None
    assert summary == "CUDA graphs: 3 of 3 plain layers graphed"    # 4 layers each, the first checkpointed
    # step 1 eager (recorded), steps 2-3 replayed: 2 micro-batches each, the layers in order
    assert calls == [0, 1, 2] * 4
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-7)
    assert got[0] != got[2]                                          # it trained


def test_cost_model_times_a_graphed_layer_by_its_gpu_line_and_the_replay_host_cost():
    """Hand-computed from the shipped H200 BERT-large profile's fit constants: a graphed plain layer's host side is
    the replay's GRAPHED_LAYER_HOST_MS (plus the engine's hooks), its GPU side the profile's GPU lines; it holds one
    more low-precision gradient per parameter (the graph's static buffers); a checkpointed layer stays eager."""
    import json
    import pathlib

    from autotune.cost_model import GRAPHED_LAYER_HOST_MS, CostModel, LayerStrategy, Setting
    from autotune.hardware import load_hardware
    from autotune.model_profile import ModelProfile
    from model_zoo import get_model_spec

    path = pathlib.Path(__file__).resolve().parents[1] / "profiles" / "h200" / "bert-large.json"
    raw = json.loads(path.read_text())
    spec, hw = get_model_spec("bert-large"), load_hardware("1xH200")
    cm = CostModel(spec, hw, ModelProfile.load(str(path)))
    lt = spec.layer(0)
    fits = raw["layer_types"][lt.name]["tp"]["1"]["fits"]
    b, chunks = 16, 2
    plain, ckpt = LayerStrategy(1, True, False), LayerStrategy(1, True, True)
    eager_set = Setting(1, 1, 1, chunks, b * chunks)
    graph_set = Setting(1, 1, 1, chunks, b * chunks, cuda_graphs=True)
    eager, graphed = cm.layer_cost(lt, plain, eager_set, 0), cm.layer_cost(lt, plain, graph_set, 0)
    engine_mb = graphed.detail["engine_microbatch_s"]
    host = chunks * (sum(GRAPHED_LAYER_HOST_MS.values()) / 1e3 + engine_mb)
    gpu = chunks * sum(fits[k]["c"] + fits[k]["m"] * b for k in ("fwd", "bwd")) / 1e3
    assert graphed.host_s == pytest.approx(host, rel=1e-9)
    assert graphed.gpu_s == pytest.approx(gpu, rel=1e-9) == pytest.approx(eager.gpu_s, rel=1e-9)
    assert eager.host_s > graphed.host_s               # the launch floors are gone
    # from the first step on, the copy of the captured micro-batch's inputs (BERT-L: 512 tokens x 1024 hidden in bf16
    # a sample); for the capture and the later steps, a bf16 gradient buffer per parameter and one micro-batch's
    # activations and workspace; Adam's moments (ZeRO-1 here) come at the first optimizer step
    assert graphed.states_bytes - eager.states_bytes == pytest.approx(512 * 1024 * 2 * b)
    assert graphed.graph_static_bytes == pytest.approx(lt.params * 2) and eager.graph_static_bytes == 0
    assert (graphed.graph_act_bytes, graphed.graph_transient_bytes) == (eager.act_bytes, eager.transient_bytes)
    assert graphed.lazy_bytes == eager.lazy_bytes == pytest.approx(lt.params * 8)
    assert cm.layer_cost(lt, ckpt, graph_set, 0) == cm.layer_cost(lt, ckpt, eager_set, 0)


@pytest.mark.parametrize("batch, graphs", [("16", True), ("64", False)])
def test_search_keeps_graphs_only_where_they_pay(tmp_path, capsys, batch, graphs):
    """One H200, ViT-L: at batch 16 the step is launch-bound and graphs take the layers' launches off it; at 64
    it is GPU-bound, the graphs gain under GRAPHS_MIN_GAIN and the plan runs eager (no static buffers)."""
    import json

    from autotune.search import GRAPHS_MIN_GAIN, main

    def plan(*extra):
        out = tmp_path / "p.json"
        assert main(["--model", "vit-large", "--hardware", "1xH200", "--global-batch-size", batch, "--out",
                     str(out), "--quiet", *extra]) == 0
        return json.loads(out.read_text())

    eager, chosen = plan(), plan("--cuda-graphs")
    assert eager["cuda_graphs"] is False and chosen["cuda_graphs"] is graphs
    t_eager, t_chosen = eager["predicted"]["step_time_s"], chosen["predicted"]["step_time_s"]
    if graphs:
        assert t_chosen * (1 + GRAPHS_MIN_GAIN) < t_eager
        assert max(chosen["predicted"]["stage_peak_memory_mb"]) > max(eager["predicted"]["stage_peak_memory_mb"])
    else:
        assert chosen == {**eager, "search": chosen["search"]}
