"""Swin on DeepSpeed + Megatron-core (CPU, gloo) matches a single-process Hugging Face SwinForImageClassification.

Single process: the adapter's layer sequence (patch embedding | every SwinLayer, patch merging on
each stage's last layer | norm, pool, classifier) gives exactly HF's loss and gradients; data and
FLOPs are checked against HF.

Multi-rank: one launch per world size trains every case below through tests/dist_runtime_plans.py
and compares 5 losses and pre-clipping gradient norms with the plain HF model trained on the same
global batches from the same full state dict (fp32, torch AdamW lr 1e-2, clip 1.0). Tolerance rtol
1e-4: all layouts compute the same fp32 sums in another order (observed differences <= 5e-6), while
a wrong head slice of a bias table or a lost gradient moves them by >= 1e-3.

Models: the swin-test preset (2 stages x 2 layers, heads 4 and 8, shifted windows in both) and a
variant with 3 stages (depths 1, 2, 1; heads 2, 4, 8) on 28 px images: its 14 x 14 and 7 x 7 token
grids need window padding and an odd patch merge, and its last stage is one window (no shift).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model_zoo.adapter import TPGroups, run_sequence
from model_zoo.registry import load_hf_config
from model_zoo.runtime import get_adapter
from model_zoo.swin.model import stage_resolutions
from tests.dist_launcher import assert_case_matches_reference, launch_plans_once
from tests.test_runtime_plans import LAYERWISE

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

RTOL = 1e-4
TASK = "image-classification"
ADAPTER = get_adapter("swin")
VARIANT = dict(model_type="swin", embed_dim=16, depths=[1, 2, 1], num_heads=[2, 4, 8], window_size=4, image_size=28,
               patch_size=2, num_labels=10, drop_path_rate=0.0, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def variant_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("swinvar") / "config.json"
    path.write_text(json.dumps(VARIANT))
    return str(path)


def _configs(variant_path: str) -> list:
    return [load_hf_config("swin-test"), load_hf_config(variant_path)]


# ---------------------------------------------------------------------------------------------- one process
def test_stage_resolutions(variant_path):
    assert stage_resolutions(load_hf_config("swin-test")) == [(16, 16), (8, 8)]
    assert stage_resolutions(load_hf_config(variant_path)) == [(14, 14), (7, 7), (4, 4)]


@pytest.mark.parametrize("which", [0, 1], ids=["swin-test", "swin-3stage-28px"])
def test_layer_sequence_matches_hf(which, variant_path):
    """The pp=1, TP-free sequence is HF's forward cut into pieces: same loss, same gradients."""
    cfg = _configs(variant_path)[which]
    torch.manual_seed(0)
    ref = ADAPTER.build_model(cfg, TASK)
    model = ADAPTER.build_model(cfg, TASK, ref.state_dict())
    batch = ADAPTER.synthetic_batch(cfg, TASK, 4, seed=3, step=1)
    ref_loss = ADAPTER.hf_loss(ref, batch)
    ref_loss.backward()
    seq = ADAPTER.layer_sequence(model, TASK)
    inputs, labels = ADAPTER.split_batch(batch, TASK)
    loss = seq.loss_fn(run_sequence(seq.entries, inputs), labels)
    loss.backward()
    assert seq.num_layers == ADAPTER.num_layers(cfg) == sum(cfg.depths)
    assert torch.equal(loss, ref_loss)
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=0, atol=0, msg=name)


def test_patch_merging_rides_on_each_stage_last_layer(variant_path):
    model = ADAPTER.build_model(load_hf_config(variant_path), TASK)
    seq = ADAPTER.layer_sequence(model, TASK)
    merges = [e.module.downsample for e in seq.layers]
    stages = model.swin.encoder.layers
    assert merges == [stages[0].downsample, None, stages[1].downsample, None]


def test_synthetic_batch_is_deterministic():
    cfg = load_hf_config("swin-test")
    a = ADAPTER.synthetic_batch(cfg, TASK, 8, seed=5, step=2)
    b = ADAPTER.synthetic_batch(cfg, TASK, 8, seed=5, step=2)
    c = ADAPTER.synthetic_batch(cfg, TASK, 8, seed=5, step=3)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["pixel_values"], c["pixel_values"])
    assert a["pixel_values"].shape == (8, 3, 32, 32) and a["labels"].shape == (8,)
    assert 0 <= int(a["labels"].min()) and int(a["labels"].max()) < cfg.num_labels


def test_collate_images_and_pixel_values():
    from PIL import Image

    cfg = load_hf_config("swin-test")
    white = Image.new("RGB", (50, 40), (255, 255, 255))
    pixels = torch.zeros(3, 32, 32)
    batch = ADAPTER.collate(cfg, TASK, [{"image": white, "label": 3}, {"pixel_values": pixels, "labels": 7}], 0, 0)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["labels"].tolist() == [3, 7]
    white_norm = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(batch["pixel_values"][0, :, 5, 5], white_norm)
    assert torch.equal(batch["pixel_values"][1], pixels)
    with pytest.raises(KeyError, match="'pixel_values' or 'image'"):
        ADAPTER.collate(cfg, TASK, [{"label": 1}], 0, 0)


@pytest.mark.parametrize("which", [0, 1], ids=["swin-test", "swin-3stage-28px"])
def test_flops_per_sample_match_flop_counter(which, variant_path):
    """Forward FLOPs x 3 of HF's eager-attention model (padded windows counted as computed)."""
    cfg = _configs(variant_path)[which]
    cfg._attn_implementation = "eager"
    model = ADAPTER.build_model(cfg, TASK)
    batch = ADAPTER.synthetic_batch(cfg, TASK, 2, 0, 0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ADAPTER.hf_loss(model, batch)
    assert ADAPTER.flops_per_sample(cfg, TASK) * 2 == pytest.approx(3 * counter.get_total_flops(), rel=1e-9)


class _Group:
    """Stands in for a process group of `n` ranks (only the head check runs before any collective)."""

    def __init__(self, n: int):
        self.n = n

    def size(self) -> int:
        return self.n

    def rank(self) -> int:
        return 0


def test_heads_not_divisible_by_tp_is_a_clear_error(variant_path):
    model = ADAPTER.build_model(load_hf_config(variant_path), TASK)
    with pytest.raises(ValueError, match="2 heads, not divisible by TP degree 4"):
        ADAPTER.tensor_parallelize(model, TASK, TPGroups(layers=[_Group(4)] * 4, vocab=_Group(1)))


# ---------------------------------------------------------------------------------------------- many ranks
# (id, model: "swin-test" or "var", plan kwargs for Plan.uniform)
CASES = {
    2: [
        ("dp2", "swin-test", {}),
        ("dp2-zero1", "swin-test", {"zero_stage": 1}),
        ("dp2-zero2-chunks2", "swin-test", {"zero_stage": 2, "chunks": 2}),
        ("dp2-zero3-ckpt1010", "swin-test", {"zero_stage": 3, "checkpoint": [1, 0, 1, 0]}),
        ("tp2", "swin-test", {"tp": 2}),
        ("tp2-ckpt1111", "swin-test", {"tp": 2, "checkpoint": 1}),
        ("pp2", "swin-test", {"pp": 2}),
        ("pp2uneven13-chunks2-ckpt1100", "swin-test", {"pp": 2, "pp_division": [1, 3], "chunks": 2,
                                                      "checkpoint": [1, 1, 0, 0]}),
        ("pp2uneven31-ckpt0011", "swin-test", {"pp": 2, "pp_division": [3, 1], "checkpoint": [0, 0, 1, 1]}),
        ("var-tp2", "var", {"tp": 2}),
        ("var-pp2-chunks2-ckpt1001", "var", {"pp": 2, "chunks": 2, "checkpoint": [1, 0, 0, 1]}),
    ],
    4: [
        ("dp4", "swin-test", {}),
        ("tp4", "swin-test", {"tp": 4}),
        ("pp4", "swin-test", {"pp": 4, "chunks": 2}),
        ("pp2-tp2-ckpt1010", "swin-test", {"pp": 2, "tp": 2, "checkpoint": [1, 0, 1, 0]}),
        ("tp2-dp2-zero2", "swin-test", {"tp": 2, "zero_stage": 2}),
        ("tp2strided-dp2-zero3", "swin-test", {"tp": 2, "tp_consecutive": 0, "zero_stage": 3}),
        ("pp2-dp2-zero1-chunks4", "swin-test", {"pp": 2, "zero_stage": 1, "chunks": 4}),
        ("var-pp2-tp2", "var", {"pp": 2, "tp": 2}),
    ]
    # Per-layer TP (see LAYERWISE in tests/test_runtime_plans.py): the first stage's 4 heads, the second's 8
    + [(cid, "swin-test", kw) for cid, kw in LAYERWISE]
    + [("var-lw1244-zero2", "var", {"tp_sizes": [1, 2, 4, 4], "vtp": 1, "zero_stage": 2})],   # heads 2 | 4 4 | 8
}

_results: dict[int, dict | Exception] = {}


def _launch(world: int, tmp_path_factory, variant_path: str) -> dict:
    cases = [{"model": variant_path if m == "var" else m, "plan": kw} for _, m, kw in CASES[world]]
    out = tmp_path_factory.mktemp(f"swin-w{world}") / "results.json" if world not in _results else None
    return launch_plans_once(_results, world, cases, out)


@pytest.mark.distributed
@pytest.mark.parametrize("world,index", [pytest.param(w, i, id=f"w{w}-{cid}")
                                         for w, cases in CASES.items() for i, (cid, _, _) in enumerate(cases)])
def test_swin_plan_matches_hf_reference(world, index, tmp_path_factory, variant_path):
    res = _launch(world, tmp_path_factory, variant_path)
    assert_case_matches_reference(res, index, RTOL)
