"""T5 on DeepSpeed + Megatron-core (CPU, gloo) matches a single-process Hugging Face T5ForConditionalGeneration.

Single process: the adapter's layer sequence (embed | encoder blocks | decoder blocks | head) gives
exactly HF's loss and gradients; data and FLOPs are checked against HF.

Multi-rank: one launch per world size trains every case below through tests/dist_runtime_plans.py
and compares 5 losses and pre-clipping gradient norms with the plain HF model trained on the same
global batches from the same full state dict (fp32, torch AdamW lr 1e-2, clip 1.0). Tolerance rtol
1e-4: all layouts compute the same fp32 sums in another order (observed differences <= 2e-6), while
a wrong shard, a lost gradient of the carried position bias or a mis-scaled tied head moves them
by >= 1e-3.

Models: the t5-test preset (2 + 2 layers, relu MLP, tied and scaled lm_head) and a T5 v1.1-style
variant (gated-gelu MLP, unscaled head, 3 encoder + 1 decoder layers, inner dim != d_model), whose
pipeline cut falls inside the encoder so the relative position bias crosses a stage.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import T5Config

from model_zoo.adapter import run_sequence
from model_zoo.registry import load_hf_config
from model_zoo.runtime import get_adapter
from tests.dist_launcher import REPO, assert_case_matches_reference, run_ranks

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

RTOL = 1e-4
TASK = "seq2seq"
SEQ = (32, 16)                     # (encoder, decoder) tokens, the t5-test preset's
ADAPTER = get_adapter("t5")
V11 = dict(model_type="t5", vocab_size=1003, d_model=64, d_kv=8, num_heads=4, d_ff=128, num_layers=3,
           num_decoder_layers=1, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)


@pytest.fixture(scope="module")
def v11_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("t5v11") / "config.json"
    path.write_text(json.dumps(V11))
    return str(path)


# ---------------------------------------------------------------------------------------------- one process
def _configs(v11_path: str) -> list[T5Config]:
    return [load_hf_config("t5-test"), load_hf_config(v11_path)]


def test_v11_variant_is_what_it_claims(v11_path):
    cfg = load_hf_config(v11_path)
    assert cfg.is_gated_act and not cfg.scale_decoder_outputs and cfg.num_decoder_layers == 1
    assert not load_hf_config("t5-test").is_gated_act and load_hf_config("t5-test").scale_decoder_outputs


@pytest.mark.parametrize("which", [0, 1], ids=["t5-test", "t5-v11"])
def test_layer_sequence_matches_hf(which, v11_path):
    """The pp=1, TP-free sequence is HF's forward cut into pieces: the same loss, and the same gradients
    up to the order in which the tied embedding's two gradient contributions are summed."""
    cfg = _configs(v11_path)[which]
    torch.manual_seed(0)
    ref = ADAPTER.build_model(cfg, TASK)
    model = ADAPTER.build_model(cfg, TASK, ref.state_dict())
    batch = ADAPTER.synthetic_batch(cfg, TASK, 4, seed=3, step=1, seq_len=SEQ)
    ref_loss = ADAPTER.hf_loss(ref, batch)
    ref_loss.backward()
    seq = ADAPTER.layer_sequence(model, TASK)
    inputs, labels = ADAPTER.split_batch(batch, TASK)
    loss = seq.loss_fn(run_sequence(seq.entries, inputs), labels)
    loss.backward()
    assert seq.num_layers == ADAPTER.num_layers(cfg) == cfg.num_layers + cfg.num_decoder_layers
    assert torch.equal(loss, ref_loss)
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-6, atol=1e-7, msg=name)


def test_sequence_ties_shared_embedding_and_lm_head():
    model = ADAPTER.build_model(load_hf_config("t5-test"), TASK)
    seq = ADAPTER.layer_sequence(model, TASK)
    first, last = seq.embed[0], seq.head[-1]
    assert first.tie_key == last.tie_key == "shared" and first.module is last.module
    assert first.forward_fn is None and last.forward_fn is not None      # DeepSpeed saves the first use's module
    assert first.module.get_parameter(first.tied_weight_attr) is model.shared.weight


def test_synthetic_batch_is_deterministic_and_shifted():
    cfg = load_hf_config("t5-test")
    a = ADAPTER.synthetic_batch(cfg, TASK, 8, seed=5, step=2, seq_len=SEQ)
    b = ADAPTER.synthetic_batch(cfg, TASK, 8, seed=5, step=2, seq_len=SEQ)
    c = ADAPTER.synthetic_batch(cfg, TASK, 8, seed=5, step=3, seq_len=SEQ)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].shape == (8, 32) and a["labels"].shape == (8, 16)
    assert ((a["labels"] != -100).sum(1) == 16).all()                   # same target count in every sample
    assert (a["attention_mask"] == 0).any()                             # source padding exercises the masks
    assert torch.equal(a["input_ids"][a["attention_mask"] == 0], torch.zeros_like(a["input_ids"][a["attention_mask"] == 0]))
    model = ADAPTER.build_model(cfg, TASK)
    model.config.decoder_start_token_id = cfg.pad_token_id               # HF's own shift needs it set
    assert torch.equal(a["decoder_input_ids"], model._shift_right(a["labels"]))
    assert ADAPTER.synthetic_batch(cfg, TASK, 2, 0, 0, seq_len=64)["labels"].shape == (2, 16)


def test_collate_pads_sources_and_ignores_target_padding():
    cfg = load_hf_config("t5-test")
    records = [{"input_ids": [5, 6, 7], "labels": [8, 9, 1]}, {"input_ids": list(range(2, 40)), "labels": list(range(3, 30))}]
    batch = ADAPTER.collate(cfg, TASK, records, seed=0, step=0, seq_len=SEQ)
    assert batch["input_ids"].shape == (2, 32) and batch["labels"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [3, 32]
    assert batch["labels"][0].tolist() == [8, 9, 1] + [-100] * 13
    assert batch["decoder_input_ids"][0, :5].tolist() == [0, 8, 9, 1, 0]    # start token, shifted, pad for -100
    model = ADAPTER.build_model(cfg, TASK)
    seq = ADAPTER.layer_sequence(model, TASK)
    inputs, labels = ADAPTER.split_batch(batch, TASK)
    with torch.no_grad():
        torch.testing.assert_close(seq.loss_fn(run_sequence(seq.entries, inputs), labels), ADAPTER.hf_loss(model, batch))
    with pytest.raises(KeyError, match="'labels'"):
        ADAPTER.collate(cfg, TASK, [{"input_ids": [5]}], 0, 0, seq_len=SEQ)


@pytest.mark.parametrize("which", [0, 1], ids=["t5-test", "t5-v11"])
def test_flops_per_sample_match_flop_counter(which, v11_path):
    """Forward FLOPs x 3 of HF's eager-attention model (counts every matmul, causal ones dense)."""
    cfg = _configs(v11_path)[which]
    cfg._attn_implementation = "eager"
    model = ADAPTER.build_model(cfg, TASK)
    batch = ADAPTER.synthetic_batch(cfg, TASK, 2, 0, 0, seq_len=SEQ)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ADAPTER.hf_loss(model, batch)
    assert ADAPTER.flops_per_sample(cfg, TASK, SEQ) * 2 == pytest.approx(3 * counter.get_total_flops(), rel=1e-9)


class _Group:
    """Stands in for a process group of `n` ranks (only the head check runs before any collective)."""

    def __init__(self, n: int):
        self.n = n

    def size(self) -> int:
        return self.n

    def rank(self) -> int:
        return 0


def test_heads_not_divisible_by_tp_is_a_clear_error():
    from model_zoo.adapter import TPGroups

    cfg = load_hf_config("t5-test")
    model = ADAPTER.build_model(cfg, TASK)
    with pytest.raises(ValueError, match="4 heads, not divisible by TP degree 8"):
        ADAPTER.tensor_parallelize(model, TASK, TPGroups(layers=[_Group(8)] * 4, vocab=_Group(1)))


# ---------------------------------------------------------------------------------------------- many ranks
# (id, model: "t5-test" or "v11", plan kwargs for Plan.uniform)
CASES = {
    2: [
        ("dp2", "t5-test", {}),
        ("dp2-zero1", "t5-test", {"zero_stage": 1}),
        ("dp2-zero2-chunks2", "t5-test", {"zero_stage": 2, "chunks": 2}),
        ("dp2-zero3-ckpt1010", "t5-test", {"zero_stage": 3, "checkpoint": [1, 0, 1, 0]}),
        ("tp2", "t5-test", {"tp": 2}),
        ("tp2-ckpt1111", "t5-test", {"tp": 2, "checkpoint": 1}),
        ("pp2", "t5-test", {"pp": 2}),
        ("pp2uneven13-chunks2-ckpt1100", "t5-test", {"pp": 2, "pp_division": [1, 3], "chunks": 2,
                                                    "checkpoint": [1, 1, 0, 0]}),
        ("pp2uneven31-ckpt0011", "t5-test", {"pp": 2, "pp_division": [3, 1], "checkpoint": [0, 0, 1, 1]}),
        ("v11-tp2", "v11", {"tp": 2}),
        ("v11-pp2-chunks2-ckpt0100", "v11", {"pp": 2, "chunks": 2, "checkpoint": [0, 1, 0, 0]}),
    ],
    4: [
        ("dp4", "t5-test", {}),
        ("tp4", "t5-test", {"tp": 4}),
        ("pp4", "t5-test", {"pp": 4, "chunks": 2}),
        ("pp2-tp2-ckpt1010", "t5-test", {"pp": 2, "tp": 2, "checkpoint": [1, 0, 1, 0]}),
        ("tp2-dp2-zero2", "t5-test", {"tp": 2, "zero_stage": 2}),
        ("tp2strided-dp2-zero3", "t5-test", {"tp": 2, "tp_consecutive": 0, "zero_stage": 3}),
        ("pp2-dp2-zero1-chunks4", "t5-test", {"pp": 2, "zero_stage": 1, "chunks": 4}),
        ("v11-pp2-tp2", "v11", {"pp": 2, "tp": 2}),
        # per-layer TP: one layout per stack (the position bias is split by heads), vtp of its own
        ("lw-enc4-dec1-vtp2-zero2", "t5-test", {"tp_sizes": [4, 4, 1, 1], "vtp": 2, "zero_stage": 2}),
        ("lw-enc1-dec2s-zero1-chunks2", "t5-test", {"tp_sizes": [1, 1, 2, 2], "tp_consecutive_flags": [1, 1, 0, 0],
                                                    "vtp": 1, "zero_stage": 1, "chunks": 2}),
    ],
}

_results: dict[int, dict] = {}


def _launch(world: int, tmp_path_factory, v11_path: str) -> dict:
    if world not in _results:
        out = tmp_path_factory.mktemp(f"t5-w{world}") / "results.json"
        cases = [{"model": v11_path if m == "v11" else m, "seq_len": list(SEQ), "plan": kw}
                 for _, m, kw in CASES[world]]
        run_ranks(REPO / "tests" / "dist_runtime_plans.py", world,
                  ["--cases", json.dumps(cases), "--out", str(out)], timeout=900)
        _results[world] = json.loads(out.read_text())
    return _results[world]


@pytest.mark.distributed
@pytest.mark.parametrize("world,index", [pytest.param(w, i, id=f"w{w}-{cid}")
                                         for w, cases in CASES.items() for i, (cid, _, _) in enumerate(cases)])
def test_t5_plan_matches_hf_reference(world, index, tmp_path_factory, v11_path):
    res = _launch(world, tmp_path_factory, v11_path)
    assert_case_matches_reference(res, index, RTOL)
