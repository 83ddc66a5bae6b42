"""Analytic activation bytes (model_zoo/<family>/spec.py) against what autograd really saves.

Reference: model_zoo.accounting.saved_tensors (saved_tensors_hooks, each storage once, weights excluded)
on the real HF modules, CPU. The specs are built with device="cpu" so that they describe the CPU SDPA
kernels. Per-layer checks exclude the inputs all layers share (T5 position biases, encoder output),
which the spec counts once in OtherModules.

Exactness: the per-sample slope (batch 2 minus batch 1) must equal act_bytes, and the batch-2 total
must equal 2 x act_bytes + act_fixed_bytes (tensors without a batch dimension: position-bias copies,
causal masks, relative-position bias, SDPA RNG state), both exactly.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from model_zoo import get_model_spec, load_hf_config
from model_zoo.accounting import saved_tensor_bytes, saved_tensors
from model_zoo.registry import family_module
from model_zoo.common import TORCH_DTYPES

TEST_PRESETS = ("bert-test", "t5-test", "vit-test", "swin-test")
# CUDA runs too where a GPU is present (the specs' default device="cuda" formulas are checked there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _layer_cases():
    for name in TEST_PRESETS:
        spec = get_model_spec(name, precision="fp32", device="cpu")
        for i, lt in enumerate(spec.layer_types):
            yield pytest.param(name, i, id=f"{name}-{lt.name}")


def _measure_layer(config, module, index: int, batch: int, precision: str, seq, ckpt: bool = False,
                   device: str = "cpu") -> int:
    torch.manual_seed(0)
    layer = module.make_layer(config, index).to(device=device, dtype=TORCH_DTYPES[precision])
    inputs = module.layer_inputs(config, index, batch, device, TORCH_DTYPES[precision], seq)
    shared = module.shared_inputs(config, index, inputs)
    if ckpt:
        rebuilt = getattr(module, "rebuilt_inputs", lambda *a: ())(config, index, inputs)
        return saved_tensor_bytes(lambda *x: checkpoint(layer, *x, use_reentrant=False), *inputs,
                                  exclude=[*shared, *rebuilt, *layer.parameters(), *layer.buffers()])
    return saved_tensor_bytes(layer, *inputs, exclude=shared)


def _seq(spec):
    return spec.seq_lens if spec.family == "t5" else spec.seq_lens[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,index", list(_layer_cases()))
def test_layer_act_bytes_match_saved_tensors(name: str, index: int, precision: str, device: str):
    spec = get_model_spec(name, precision=precision, device=device)
    config, module = load_hf_config(name), family_module(load_hf_config(name).model_type)
    lt = spec.layer_types[index]
    one = _measure_layer(config, module, index, 1, precision, _seq(spec), device=device)
    two = _measure_layer(config, module, index, 2, precision, _seq(spec), device=device)
    assert two - one == lt.act_bytes[1], f"{lt.name}: per-sample saved {two - one}, spec {lt.act_bytes[1]}"
    assert two == 2 * lt.act_bytes[1] + lt.act_fixed_bytes[1], f"{lt.name}: batch-independent part"


def _real_cases():
    """Real sizes where padding rules bite: ViT-huge (257 tokens, head dim 80), Swin-base (7x7 windows:
    49 is neither 16- nor 32-aligned), T5-base and BERT-base at their default lengths."""
    for name in ("bert-base", "t5-base", "vit-huge", "swin-base"):
        spec = get_model_spec(name)
        for i, lt in enumerate(spec.layer_types):
            if lt.name not in ("swin_s2_sw_merge",):                  # s2 merge: covered by s0/s1 merges
                yield pytest.param(name, i, id=f"{name}-{lt.name}")


@pytest.mark.parametrize("device,precision", [("cpu", "fp32")] + [("cuda", p) for p in ("bf16", "fp32")
                                                                   if "cuda" in DEVICES])
@pytest.mark.parametrize("name,index", list(_real_cases()))
def test_real_size_layers(name: str, index: int, device: str, precision: str):
    spec = get_model_spec(name, precision=precision, device=device)
    config = load_hf_config(name)
    module = family_module(config.model_type)
    lt = spec.layer_types[index]
    one = _measure_layer(config, module, index, 1, precision, _seq(spec), device=device)
    two = _measure_layer(config, module, index, 2, precision, _seq(spec), device=device)
    assert (two - one, two - 2 * (two - one)) == (lt.act_bytes[1], lt.act_fixed_bytes[1])


@pytest.mark.parametrize("name,index", list(_layer_cases()))
def test_checkpointed_layer_keeps_only_its_input(name: str, index: int):
    spec = get_model_spec(name, precision="fp32", device="cpu")
    config = load_hf_config(name)
    measured = _measure_layer(config, family_module(config.model_type), index, 2, "fp32", _seq(spec), ckpt=True)
    assert measured == 2 * spec.layer_types[index].ckpt_bytes


# ------------------------------------------------------------------------------------------ whole model
def _task_model(name: str, spec):
    from transformers import (BertForMaskedLM, BertForSequenceClassification, SwinForImageClassification,
                              T5ForConditionalGeneration, ViTForImageClassification)
    classes = {("bert", "mlm"): BertForMaskedLM, ("bert", "text-classification"): BertForSequenceClassification,
               ("t5", "seq2seq"): T5ForConditionalGeneration,
               ("vit", "image-classification"): ViTForImageClassification,
               ("swin", "image-classification"): SwinForImageClassification}
    torch.manual_seed(0)
    return classes[(spec.family, spec.task)](load_hf_config(name)).train()


def _batch(spec, config, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    if spec.family in ("vit", "swin"):
        size = config.image_size
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=g),
                "labels": torch.randint(0, config.num_labels, (batch,), generator=g)}
    ids = torch.randint(5, config.vocab_size, (batch, spec.seq_lens[0]), generator=g)
    if spec.family == "t5":   # padded sources, as the spec assumes: the last source token is padding
        mask = torch.ones_like(ids)
        mask[:, -1] = 0
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.randint(5, config.vocab_size, (batch, spec.seq_lens[1]), generator=g)}
    if spec.task == "mlm":
        return {"input_ids": ids, "labels": ids.clone()}
    return {"input_ids": ids, "labels": torch.randint(0, config.num_labels, (batch,), generator=g)}


def _model_case_ids():
    return [("bert-test", "mlm"), ("bert-test", "text-classification"), ("t5-test", None), ("vit-test", None),
            ("swin-test", None)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,task", _model_case_ids(), ids=lambda x: str(x))
def test_whole_model_act_bytes(name: str, task: str | None, device: str):
    """Layers + other modules (vtp=1) = what the full HF task model saves per sample, loss included."""
    spec = get_model_spec(name, precision="fp32", task=task, device=device)
    model = _task_model(name, spec).to(device)
    per_batch = {}
    for b in (1, 2):
        batch = {k: v.to(device) for k, v in _batch(spec, model.config, b).items()}
        per_batch[b] = saved_tensor_bytes(lambda **kw: model(**kw).loss, **batch)
    expected = sum(spec.layer(i).act_bytes[1] for i in range(spec.num_layers))
    expected += spec.other.act_bytes_first[1] + spec.other.act_bytes_last[1]
    if spec.family == "t5":
        # HF's T5Stack builds the encoder's bool padding mask once for all layers; the runtime's layers
        # (model_zoo/t5/model.py, which the spec describes) each build their own, which torch.where keeps.
        S, n_enc = spec.seq_lens[0], spec.layer_types[0].count
        expected -= (n_enc - 1) * S * S
    assert per_batch[2] - per_batch[1] == expected


# ------------------------------------------------------------------------------------------ TP split
@pytest.mark.parametrize("device,precision", [("cpu", "fp32")] + [("cuda", "bf16")] * ("cuda" in DEVICES))
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name,index", list(_layer_cases()))
def test_tp_act_bytes_match_a_sharded_layer(name: str, index: int, tp: int, device: str, precision: str):
    """act_bytes[tp] = what one rank saves when heads and FFN are split tp ways and the rest replicated
    (the shard built from tp_shard_config: Q/K/V/fc1 narrowed on outputs, proj/fc2 on inputs)."""
    spec = get_model_spec(name, precision=precision, device=device)
    config = load_hf_config(name)
    module = family_module(config.model_type)
    shard = module.tp_shard_config(config, index, tp)
    one = _measure_layer(shard, module, index, 1, precision, _seq(spec), device=device)
    two = _measure_layer(shard, module, index, 2, precision, _seq(spec), device=device)
    lt = spec.layer_types[index]
    assert two - one == lt.act_bytes[tp]
    assert two == 2 * lt.act_bytes[tp] + lt.act_fixed_bytes[tp]
    layer = module.make_layer(shard, index)
    full = module.make_layer(config, index)
    n_shard, n_full = sum(p.numel() for p in layer.parameters()), sum(p.numel() for p in full.parameters())
    assert n_full > n_shard > n_full // tp                                 # some parameters stay replicated


# ------------------------------------------------------------------------------------------ helper itself
def test_saved_tensor_bytes_counts_storages_once_and_skips_weights():
    lin = torch.nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 8, requires_grad=True)

    def fn(t):
        y = lin(t)                      # saves t (weight excluded)
        return (y * y).sum() + (t * 2).sum()   # y saved twice (one storage); t*2 saves nothing

    storages, _ = saved_tensors(fn, x, exclude=list(lin.parameters()))
    assert sorted(s.nbytes for s in storages) == [4 * 8 * 4, 4 * 8 * 4]
    assert saved_tensor_bytes(fn, x) == 4 * 8 * 4 * 2 + 8 * 8 * 4    # not a module: weight counted


# ------------------------------------------------------------------------------------------ train.py's sequence
@pytest.mark.parametrize("name", ["bert-test", "vit-test"])
def test_sequence_probe_layers_match_spec(name: str, tmp_path):
    """scripts/sequence_activation_probe.py charges each Transformer layer of train.py's own sequence what the
    spec says one layer keeps (CPU, fp32, batch 2): the probe counts the real runtime, the spec is checked
    against HF modules above."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "probe.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29631" if name == "bert-test" else "29632",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    r = subprocess.run([sys.executable, "scripts/sequence_activation_probe.py", "--model", name, "--batch", "2",
                        "--out", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    spec = get_model_spec(name, precision="fp32", device="cpu")
    lt = spec.layer_types[0]
    layers = [row["saved_mb"] * 2 ** 20 for row in rows if row["kind"] == "layer"]
    assert len(layers) == spec.num_layers
    assert layers == [pytest.approx(2 * lt.act_bytes[1] + lt.act_fixed_bytes[1], abs=0.5)] * spec.num_layers
