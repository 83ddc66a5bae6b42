"""The engine's optional modes on CPU: DeepSpeed torch_autocast (fp32 weights, bf16 autocast)."""
from __future__ import annotations

import pytest
import torch

from autotune.plan import Plan
from backends.data import SyntheticData
from backends.deepspeed.engine import build_engine
from backends.megatron.groups import build_parallel_groups, destroy_parallel_groups
from model_zoo.registry import load_hf_config
from model_zoo.runtime import get_adapter


def _bert_test_trainer(*, ckpt: int = 0, autocast: bool = False, from_state: bool = False,
                       engine_kw: dict | None = None, **plan_kw):
    """bert-test (MLM) on one process under a uniform plan, seeded: its trainer and synthetic
    data. `from_state` builds the model from a state dict (weights loaded in the plan's dtype);
    `engine_kw`: more build_engine arguments."""
    adapter, config = get_adapter("bert"), load_hf_config("bert-test")
    n = adapter.num_layers(config)
    plan = Plan.uniform(num_layers=n, world_size=1, checkpoint=[1] * ckpt + [0] * (n - ckpt), **plan_kw)
    groups = build_parallel_groups(plan)
    torch.manual_seed(0)
    model = adapter.build_model(config, "mlm")
    if from_state:
        model = adapter.build_model(config, "mlm", model.state_dict())
    trainer = build_engine(plan, groups, adapter.layer_sequence(model, "mlm"), lr=1e-3, autocast=autocast,
                           **(engine_kw or {}))
    return trainer, SyntheticData(adapter, config, "mlm", plan, 0, 1)


def _close(trainer) -> None:
    trainer.destroy()
    destroy_parallel_groups()


def _losses(precision: str, autocast: bool, steps: int = 3) -> tuple[list[float], torch.dtype, dict]:
    trainer, data = _bert_test_trainer(autocast=autocast, from_state=True, global_bsz=4, precision=precision)
    losses = [trainer.train_step(data.micro_batches(s)).loss for s in range(steps)]
    dtype = next(trainer.engine.module.parameters()).dtype
    cfg = trainer.ds_config
    _close(trainer)
    return losses, dtype, cfg


def test_autocast_mode_keeps_fp32_weights_and_tracks_fp32_training(world_of_one):
    ref, ref_dtype, _ = _losses("fp32", autocast=False)
    amp, amp_dtype, cfg = _losses("bf16", autocast=True)
    assert ref_dtype == amp_dtype == torch.float32
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not cfg["bf16"]["enabled"]
    assert amp == pytest.approx(ref, rel=2e-2)         # bf16 matmuls: same trajectory to bf16 precision
    assert amp != ref                                  # and autocast really ran in bf16


def _sequence(n: int):
    from model_zoo.adapter import LayerSequence, PipeEntry

    layers = [PipeEntry(module=torch.nn.Linear(2, 2), kind="layer") for _ in range(n)]
    return LayerSequence(embed=[], layers=layers, head=[], loss_fn=lambda x, y: x.sum())


def test_cuda_graph_modes_leave_checkpointed_layers_eager():
    """A checkpointed layer recomputes inside backward, over CUDA-graph outputs still in use (T5-large on an
    H100 failed so, compiled with or without graphs): under a graph mode it stays eager; other modes compile
    every layer."""
    from backends.deepspeed.engine import compile_layers

    plan = Plan.uniform(num_layers=4, world_size=1, checkpoint=[1, 0, 1, 0])
    seq = _sequence(4)
    compile_layers(plan, seq, "reduce-overhead")
    assert [e.module._compiled_call_impl is not None for e in seq.layers] == [False, True, False, True]
    seq = _sequence(4)
    compile_layers(plan, seq, "default")
    assert all(e.module._compiled_call_impl is not None for e in seq.layers)


def test_cuda_graph_modes_refused_with_pipelines():
    from backends.deepspeed.engine import check_compile_mode

    plan = Plan.uniform(num_layers=4, world_size=2, pp=2)
    with pytest.raises(ValueError, match="pp > 1.*--compile default"):
        check_compile_mode(plan, "reduce-overhead")
    check_compile_mode(plan, "default")
    check_compile_mode(Plan.uniform(num_layers=4, world_size=1), "max-autotune")


def _grad_partition_copies(chunks: int) -> float:
    """Most gradient-partition copies alive at once during one fp32 ZeRO-2 step of bert-test: distinct
    storages of DeepSpeed's current partition buffer and of its running sum, over the partition's bytes."""
    trainer, data = _bert_test_trainer(zero_stage=2, chunks=chunks, global_bsz=2 * chunks, precision="fp32")
    opt = trainer.engine.optimizer
    partition = 4 * sum(p.numel() for group in opt.params_in_partition for p in group)
    seen = []
    copy = opt.copy_grads_in_partition

    def spy(param, *args, **kwargs):
        copy(param, *args, **kwargs)
        tensors = [opt.grads_in_partition] + [t for ts in opt.all_grad_tensors.values() if ts for t in ts]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
        seen.append(sum(storages.values()) / partition)

    opt.copy_grads_in_partition = spy
    for s in range(2):
        trainer.train_step(data.micro_batches(s))
    _close(trainer)
    return max(seen)


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_fp32_zero2_accumulation_holds_two_gradient_partitions_as_modelled(world_of_one, chunks):
    """DeepSpeed's fp32 ZeRO-2 drops its gradient partition after each micro-batch while keeping views of it
    as the running sum, so every later micro-batch allocates a second one; CostModel.phases charges it
    (regrad) for the same plans. Measured on the engine here, predicted by the model there."""
    from autotune.cost_model import CostModel
    from model_zoo import get_model_spec

    measured = _grad_partition_copies(chunks)
    cm = CostModel(get_model_spec("bert-test", precision="fp32"), None)
    held, accum, regrad = cm.phases(*cm.states_bytes(1e6, 1, 2), chunks, 2)
    assert measured == pytest.approx(1 + regrad / 4e6, abs=0.02)


def _synchronizes_per_step(zero: int, chunks: int, steps: int = 4) -> dict[str, int]:
    """Device synchronisations DeepSpeed asks its accelerator for during train steps of bert-test, by the
    DeepSpeed file asking (the steps after the first two: DeepSpeed's throughput timer starts at step 2)."""
    import inspect

    from deepspeed.accelerator import get_accelerator

    trainer, data = _bert_test_trainer(zero_stage=zero, chunks=chunks, global_bsz=2 * chunks, precision="bf16")
    acc, calls = get_accelerator(), {}
    real = acc.synchronize

    def counting(*args, **kwargs):
        caller = inspect.stack()[1].filename
        key = caller[caller.rindex("deepspeed/"):] if "deepspeed/" in caller else caller
        calls[key] = calls.get(key, 0) + 1
        return real(*args, **kwargs)

    try:
        for s in range(steps):
            if s == 2:
                acc.synchronize = counting
            trainer.train_step(data.micro_batches(s))
    finally:
        acc.synchronize = real
        _close(trainer)
    return calls


@pytest.mark.parametrize("zero,chunks", [(0, 1), (1, 3), (2, 2)])
def test_no_device_synchronisation_inside_a_step(world_of_one, zero, chunks):
    """DeepSpeed's throughput timer (on by default) synchronises the device at every forward and every
    engine.step(), i.e. at each micro-batch boundary: the host cannot queue the next micro-batch while the GPU
    still runs the last backward, so chunked steps lose the host/GPU overlap the cost model charges. The runtime
    turns the timer off; train.py times steps itself."""
    assert _synchronizes_per_step(zero, chunks) == {}


class _ReadBacks(torch.overrides.TorchFunctionMode):
    """Records (function, file:line) of this repository's code for every tensor read on the host (item,
    bool, float, int, tolist) made while active: on a GPU each one waits for the device."""
    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.tolist}

    def __init__(self):
        super().__init__()
        self.sites: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            import traceback

            inner = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename][-1]
            if any(f"/{d}/" in inner.filename for d in ("model_zoo", "backends")):     # ours, not DeepSpeed's
                self.sites.append((inner.name, f"{inner.filename.rsplit('/', 2)[-2]}/{inner.lineno}"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("zero,chunks,ckpt", [(0, 1, 0), (1, 2, 2), (2, 2, 0), (3, 1, 2)])
def test_our_code_reads_back_only_the_finished_steps_loss_and_norm(world_of_one, zero, chunks, ckpt):
    """Inside a train step this repository reads nothing back from the device: the mask's answer comes from
    the host (answer_on_host works on the CPU batch), and the loss and gradient norm are read once the whole
    step is queued (the StepResult of train_step's _step). A read-back in a layer, a hook or the clip would show here."""
    trainer, data = _bert_test_trainer(ckpt=ckpt, zero_stage=zero, chunks=chunks, global_bsz=2 * chunks,
                                       precision="bf16")
    try:
        trainer.train_step(data.micro_batches(0))
        spy = _ReadBacks()
        with spy:
            trainer.train_step(data.micro_batches(1))
    finally:
        _close(trainer)
    # ZeRO-0's optimizer step (backends/deepspeed/fast_step.py) returns DeepSpeed's host overflow flag: it reads
    # the skip flag once the whole step is queued, then the norm it has computed (a float, as DeepSpeed keeps it)
    allowed = {"answer_on_host", "_step", "_norm"} | ({"step"} if zero == 0 else set())
    assert [s for s in spy.sites if s[0] not in allowed] == []
    assert [s[0] for s in spy.sites if s[0] == "step"] == ["step"] * (2 if zero == 0 else 0)
    # the loss once; the norm once where DeepSpeed keeps it as a tensor
    assert [s[0] for s in spy.sites if s[0] in ("_step", "_norm")] == ["_step"] + ["_norm"] * (zero > 0)
