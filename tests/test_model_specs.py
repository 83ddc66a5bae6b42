"""ModelSpec parameters, FLOPs and inputs against independent references.

References: the HF task models built on the meta device (parameter counts, tied weights counted once),
torch.utils.flop_counter.FlopCounterMode on real CPU forwards (matmul FLOPs), and hand computation.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (BertForMaskedLM, BertForSequenceClassification, SwinForImageClassification,
                          T5ForConditionalGeneration, ViTForImageClassification)

from model_zoo import FAMILIES, PRESETS, ModelInputError, get_model_spec, load_hf_config
from model_zoo.base import pad_vocab
from model_zoo.registry import family_module
from model_zoo.swin.spec import layer_kinds

TASK_CLASSES = {("bert", "mlm"): BertForMaskedLM, ("bert", "text-classification"): BertForSequenceClassification,
                ("t5", "seq2seq"): T5ForConditionalGeneration,
                ("vit", "image-classification"): ViTForImageClassification,
                ("swin", "image-classification"): SwinForImageClassification}
TEST_PRESETS = ("bert-test", "t5-test", "vit-test", "swin-test")


def _numel(*modules: torch.nn.Module) -> int:
    """Parameters of the modules, shared Parameters once (as nn.Module.parameters() deduplicates)."""
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def _meta_model(name: str, task: str):
    spec = get_model_spec(name, task=task)
    with torch.device("meta"):
        return spec, TASK_CLASSES[(spec.family, spec.task)](load_hf_config(name))


def _hf_layer_modules(spec, model, type_index: int) -> list[torch.nn.Module]:
    """The HF modules that make up one layer of type `type_index` in the full model (an independent pick)."""
    if spec.family == "bert":
        return [model.bert.encoder.layer[-1]]
    if spec.family == "vit":
        return [model.vit.layers[-1]]
    if spec.family == "t5":                     # block 0 of a stack also owns the relative bias table
        return [(model.encoder if type_index == 0 else model.decoder).block[1]]
    kinds = list(dict.fromkeys(layer_kinds(model.config)))
    kind = kinds[type_index]
    stage = model.swin.encoder.layers[kind.stage]
    block = stage.blocks[-1] if kind.merge else stage.blocks[1 if kind.shifted else 0]
    return [block, stage.downsample] if kind.merge else [block]


MODEL_CASES = [(name, None) for name in PRESETS] + [("bert-base", "text-classification"),
                                                    ("bert-test", "text-classification")]


@pytest.mark.parametrize("name,task", MODEL_CASES, ids=[f"{n}-{t or 'default'}" for n, t in MODEL_CASES])
def test_params_match_hf_model(name: str, task: str | None):
    spec, model = _meta_model(name, task)
    assert spec.params_total(1) == _numel(model)
    for i, lt in enumerate(spec.layer_types):
        assert lt.params == _numel(*_hf_layer_modules(spec, model, i)), lt.name
    assert sum(lt.count for lt in spec.layer_types) == spec.num_layers


def test_vocab_padding_params_by_hand():
    """bert-test: vocab 1003 padded to 1004 at vtp=4; hidden 64, 64 positions, 2 token types."""
    other = get_model_spec("bert-test").other
    assert pad_vocab(1003, 4) == 1004
    assert other.params_first[4] == 1004 * 64 + 64 * 64 + 2 * 64 + 2 * 64
    assert other.params_last[4] == (64 * 64 + 64) + 2 * 64 + 1004 * 64 + 1004     # transform, tied decoder, bias
    assert other.tied_params[4] == 1004 * 64
    assert other.params_first[1] == 1003 * 64 + 64 * 64 + 4 * 64
    assert other.params_first[64] == 1024 * 64 + 64 * 64 + 4 * 64


# ------------------------------------------------------------------------------------------ FLOPs
def _count_flops(fn, *args, **kwargs) -> int:
    """Matmul FLOPs of one forward; the math SDPA kernel makes attention visible as bmm to the counter."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def _flop_cases():
    for name in TEST_PRESETS:
        for i, lt in enumerate(get_model_spec(name, precision="fp32").layer_types):
            yield pytest.param(name, i, id=f"{name}-{lt.name}")


@pytest.mark.parametrize("name,index", list(_flop_cases()))
def test_layer_flops_match_flop_counter(name: str, index: int):
    spec = get_model_spec(name, precision="fp32")
    config = load_hf_config(name)
    module = family_module(config.model_type)
    seq = spec.seq_lens if spec.family == "t5" else spec.seq_lens[0]
    layer = module.make_layer(config, index)
    inputs = module.layer_inputs(config, index, 2, "cpu", torch.float32, seq)
    assert _count_flops(layer, *inputs) == 2 * spec.layer_types[index].fwd_flops


@pytest.mark.parametrize("name,task", [("bert-test", "mlm"), ("bert-test", "text-classification"), ("t5-test", None),
                                       ("vit-test", None), ("swin-test", None)])
def test_model_flops_match_flop_counter(name: str, task: str | None):
    """Layers + embeddings + heads = FLOPs of the whole HF task model's forward (loss included)."""
    spec = get_model_spec(name, precision="fp32", task=task)
    config = load_hf_config(name)
    model = TASK_CLASSES[(spec.family, spec.task)](config).train()
    if spec.family in ("vit", "swin"):
        batch = {"pixel_values": torch.randn(2, config.num_channels, config.image_size, config.image_size),
                 "labels": torch.tensor([0, 1])}
    elif spec.family == "t5":
        batch = {"input_ids": torch.randint(2, 1003, (2, spec.seq_lens[0])),
                 "labels": torch.randint(2, 1003, (2, spec.seq_lens[1]))}
    else:
        ids = torch.randint(5, 1003, (2, spec.seq_lens[0]))
        batch = {"input_ids": ids, "labels": ids if spec.task == "mlm" else torch.tensor([0, 1])}
    per_sample = sum(spec.layer(i).fwd_flops for i in range(spec.num_layers))
    per_sample += spec.other.fwd_flops_first + spec.other.fwd_flops_last
    assert _count_flops(model, **batch) == 2 * per_sample


# ------------------------------------------------------------------------------------------ registry
def test_families_and_presets_cover_all_four():
    assert set(FAMILIES.values()) == {"bert", "t5", "vit", "swin"}
    assert {p.family for p in PRESETS.values()} == {"bert", "t5", "vit", "swin"}
    assert all(p.source for p in PRESETS.values())


def test_test_presets_are_exactly_comparable():
    """Every dropout is 0, heads divide by 4 in every layer type, text vocab is not a multiple of 4."""
    for name in TEST_PRESETS:
        config = load_hf_config(name).to_dict()
        dropouts = {k: v for k, v in config.items() if ("dropout" in k or "drop_path" in k) and v is not None}
        assert dropouts and all(v == 0 for v in dropouts.values()), (name, dropouts)
        spec = get_model_spec(name)
        assert all(lt.heads % 4 == 0 and lt.tp_ok(4) for lt in spec.layer_types), name
        if spec.other.vocab_size:
            assert spec.other.vocab_size % 4 != 0


@pytest.mark.parametrize("bad", ["no-such-model", "/no/such/path/config.json", ""])
def test_unknown_model_is_a_model_input_error(bad: str):
    with pytest.raises(ModelInputError, match="unknown model"):
        get_model_spec(bad)


def test_unsupported_model_type_task_and_precision(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ModelInputError, match="gpt2"):
        load_hf_config(path)
    with pytest.raises(ModelInputError, match="task"):
        get_model_spec("vit-test", task="mlm")
    with pytest.raises(ModelInputError, match="precision"):
        get_model_spec("bert-test", precision="int8")
    with pytest.raises(ModelInputError, match="seq_len"):
        get_model_spec("bert-test", seq_len=0)
    assert issubclass(ModelInputError, ValueError)


def test_load_from_config_file_and_checkpoint_folder(tmp_path):
    reference = get_model_spec("bert-test")
    config = load_hf_config("bert-test")
    config.save_pretrained(tmp_path / "cfg")
    from_file = get_model_spec(tmp_path / "cfg" / "config.json", seq_len=32)
    BertForMaskedLM(config).save_pretrained(tmp_path / "ckpt")
    from_folder = get_model_spec(str(tmp_path / "ckpt"), seq_len=32)
    for spec in (from_file, from_folder):
        assert spec.layer_types == reference.layer_types
        assert spec.other == reference.other
        assert spec.family == "bert" and spec.task == "mlm"
    BertForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    assert get_model_spec(tmp_path / "cls").task == "text-classification"     # from config.architectures


def test_seq_len_overrides():
    assert get_model_spec("bert-test", seq_len=16).layer_types[0].seq_len == 16
    t5 = get_model_spec("t5-base", seq_len=256)
    assert t5.seq_lens == (256, 64) and [lt.seq_len for lt in t5.layer_types] == [256, 64]
    assert get_model_spec("t5-base", seq_len=(128, 32)).seq_lens == (128, 32)
    assert get_model_spec("vit-base").seq_lens == (197,)
    assert get_model_spec("swin-base").seq_lens == (3136, 784, 196, 49)


def test_layer_contracts():
    """TP degrees follow the heads; boundaries, all-reduces and checkpoint bytes follow the shapes."""
    swin = get_model_spec("swin-huge")
    assert swin.valid_tp_degrees(64) == [1, 2, 4]               # 12 heads in the first stage
    assert not swin.layer_types[0].tp_ok(8) and swin.layer_types[-1].tp_ok(32)
    t5 = get_model_spec("t5-3b", precision="bf16")
    enc, dec = t5.layer_types
    assert (enc.tp_allreduces_fwd, dec.tp_allreduces_fwd) == (2, 3)
    assert enc.boundary_bytes == dec.boundary_bytes == (512 + 128) * 1024 * 2
    assert dec.ckpt_bytes == 128 * 1024 * 2 and dec.tp_allreduce_bytes == 128 * 1024 * 2
    bert = get_model_spec("bert-large", precision="fp32").layer_types[0]
    assert bert.ckpt_bytes == bert.boundary_bytes == bert.tp_allreduce_bytes == 512 * 1024 * 4
    for tp in (2, 4, 8, 16):                                    # replicated part stays, the rest divides
        assert bert.act_bytes[tp] < bert.act_bytes[tp // 2] < 2 * bert.act_bytes[tp]
