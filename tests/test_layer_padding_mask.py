"""layer_padding_mask: the mask HF's create_bidirectional_mask builds, with the GPU read-back of "does it mask
anything" done once per mask tensor instead of once per layer."""
import pytest
import torch
from transformers import BertConfig, T5Config
from transformers.masking_utils import create_bidirectional_mask

from model_zoo.common import layer_padding_mask


def _configs():
    bert = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)
    t5 = T5Config(d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2)
    for c in (bert, t5):
        c._attn_implementation = "sdpa"
    return bert, t5


@pytest.mark.parametrize("padded", [False, True])
def test_same_mask_as_hf_self_and_cross_attention(padded):
    bert, t5 = _configs()
    hidden, dec = torch.randn(3, 6, 32), torch.randn(3, 4, 32)
    mask = torch.ones(3, 6, dtype=torch.long)
    if padded:
        mask[1, 4:] = 0
        mask[2, 5:] = 0
    for config, kwargs in ((bert, {"inputs_embeds": hidden}), (t5, {"inputs_embeds": dec,
                                                                   "encoder_hidden_states": hidden})):
        ref = create_bidirectional_mask(config=config, attention_mask=mask, **kwargs)
        ours = layer_padding_mask(config, kwargs["inputs_embeds"], mask, kwargs.get("encoder_hidden_states"))
        if not padded:
            assert ref is None and ours is None          # SDPA may take flash attention
        else:
            assert ours.dtype == ref.dtype == torch.bool and ours.shape == ref.shape and ours.is_contiguous()
            assert torch.equal(ours, ref)


def _mask_read_backs(monkeypatch) -> list:
    """Calls of Tensor.all made by layer_padding_mask (the read-back it does when no answer came along)."""
    import sys
    calls, real_all = [], torch.Tensor.all

    def counting_all(self, *a, **k):
        if sys._getframe(1).f_code.co_name == "layer_padding_mask":
            calls.append(self.shape)
        return real_all(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "all", counting_all)
    return calls


def test_the_read_back_happens_once_per_mask_tensor(monkeypatch):
    bert, _ = _configs()
    hidden = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    calls = _mask_read_backs(monkeypatch)
    first = layer_padding_mask(bert, hidden, mask)
    for _ in range(23):                                   # the other layers of the stage
        assert torch.equal(layer_padding_mask(bert, hidden, mask), first)
    assert calls == [mask.shape]
    # a new micro-batch is a new tensor: asked again
    layer_padding_mask(bert, hidden, torch.ones(2, 5, dtype=torch.long))
    assert len(calls) == 2


def test_other_attention_implementations_get_hfs_own_mask():
    bert, _ = _configs()
    bert._attn_implementation = "eager"
    hidden = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 2:] = 0
    ref = create_bidirectional_mask(config=bert, inputs_embeds=hidden, attention_mask=mask)
    assert torch.equal(layer_padding_mask(bert, hidden, mask), ref) and ref.dtype != torch.bool


def test_a_compiled_layer_gets_hfs_mask_without_a_graph_break():
    """Under torch.compile (train.py --compile compiles each layer entry) the builder hands over to HF,
    which then builds the mask without the read-back: fullgraph=True would raise on a graph break."""
    bert, _ = _configs()
    hidden = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    compiled = torch.compile(lambda h, m: layer_padding_mask(bert, h, m), backend="eager", fullgraph=True)
    out = compiled(hidden, mask)
    assert torch.equal(out, layer_padding_mask(bert, hidden, mask))


@pytest.mark.parametrize("family,model,task,zero", [("bert", "bert-test", "mlm", 0), ("t5", "t5-test", "seq2seq", 0),
                                                    ("bert", "bert-test", "mlm", 3)])
def test_train_steps_take_the_answer_from_the_host(world_of_one, monkeypatch, family, model, task, zero):
    """Through train.py's path (host batch -> split_batch -> the engine's device move -> layers, every layer
    checkpointed, two micro-batches) no layer reads the mask back, not even a recomputed one, whose inputs
    are detached copies, nor under ZeRO-3, whose hooks hand each module detached aliases of its inputs. A mask
    that comes without the answer (a device tensor) is asked once per micro-batch: the count the test would
    see if the answer were lost on the way."""
    from autotune.plan import Plan
    from backends.data import SyntheticData
    from backends.deepspeed.engine import build_engine
    from backends.megatron.groups import build_parallel_groups, destroy_parallel_groups
    from model_zoo.common import get_mask_answer
    from model_zoo.registry import load_hf_config
    from model_zoo.runtime import get_adapter

    adapter, config = get_adapter(family), load_hf_config(model)
    n = adapter.num_layers(config)
    plan = Plan.uniform(num_layers=n, world_size=1, global_bsz=4, chunks=2, checkpoint=[1] * n, zero_stage=zero)
    groups = build_parallel_groups(plan)
    trainer = build_engine(plan, groups, adapter.layer_sequence(adapter.build_model(config, task), task))
    data = SyntheticData(adapter, config, task, plan, 0, 1)
    try:
        calls = _mask_read_backs(monkeypatch)
        trainer.train_step(data.micro_batches(0))
        assert calls == []
        stripped = []
        for inputs, labels in data.micro_batches(1):
            inputs = tuple(t.clone() for t in inputs)            # same values, no answer on them
            assert not any(get_mask_answer(t) is not None for t in inputs)
            stripped.append((inputs, labels))
        trainer.train_step(stripped)
        # each micro-batch: the first layer asks in forward; later layers and the recomputed ones reuse it
        assert len(calls) == 2
    finally:
        trainer.destroy()
        destroy_parallel_groups()


def test_a_recomputed_layer_keeps_no_input_alive_after_its_backward(world_of_one):
    """Recompute hands the mask's answer to the recompute by value: after backward, with the graph (and
    the checkpoint's run function) still referenced through the loss, the layer's hidden input is freed
    as it is without the answer. Holding the inputs in the run function kept every layer's input until
    the graph went (T5-large on an H200, fully checkpointed: +31 MB a sample at the peak)."""
    import gc
    import weakref

    from backends.deepspeed.layers import Recompute
    from model_zoo.common import MASK_ANSWER, answer_on_host

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.seen = []

        def forward(self, inputs):
            hidden, mask = inputs
            self.seen.append(getattr(mask, MASK_ANSWER, None))
            return torch.tanh(self.lin(hidden)), mask

    layer = Layer()
    wrapped = Recompute(layer)
    hidden = torch.randn(4, 3, 8, requires_grad=True) * 2          # a non-leaf, as a layer's input is
    mask = answer_on_host(torch.ones(4, 3, dtype=torch.long))
    ref = weakref.ref(hidden)
    out, _ = wrapped((hidden, mask))
    loss = out.sum()
    del hidden, out
    loss.backward()
    gc.collect()
    assert layer.seen == [True, True]                 # forward and recompute both had the answer
    assert ref() is None                              # freed while `loss` still holds the graph
    del loss


def test_an_alias_of_the_mask_keeps_its_answer_but_not_another_view_or_a_written_one():
    """DeepSpeed's ZeRO-3 hooks hand a module `input.detach()` through an autograd Function: a new tensor on
    the same storage. It finds the answer there; a slice of the storage (another view) or the mask written in
    place after the answer was taken does not."""
    from model_zoo.common import answer_on_host, get_mask_answer

    mask = answer_on_host(torch.ones(2, 4, dtype=torch.long))
    assert get_mask_answer(mask.detach()) is True
    assert get_mask_answer(mask[:, :2]) is None
    written = mask.detach()
    written[0, 3] = 0                                  # shares the version counter: every alias sees the write
    assert get_mask_answer(mask.detach()) is None
    assert get_mask_answer(torch.ones(2, 4, dtype=torch.long)) is None
