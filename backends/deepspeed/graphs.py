"""Per-layer CUDA graphs of the eager kernels (train.py --cuda-graphs).

Our one-GPU steps are mostly launch-bound: the host queues a layer's kernels more slowly than the GPU runs them,
and the host's speed on the lent machines moves by up to 2x within seconds. A CUDA graph replays a layer's
recorded kernels with one launch, so the GPU no longer waits for the host and the step takes what the
kernels take. Unlike torch.compile's reduce-overhead mode these are the eager kernels, the ones the model
profiles timed, so a graphed step should take what the profiles' GPU lines say.

torch.cuda.make_graphed_callables captures every plain Transformer layer of the pp = 1 model in one call
(one memory pool; forward in layer order, backward in reverse, as training runs them), from the inputs
each layer saw in the first micro-batch of the first step (which runs eager). A later call whose inputs
differ in shape, dtype or mask answer runs eager, and so do eval mode and no-grad calls. Left eager:
checkpointed layers (their recompute would replay a forward whose outputs are still in use) and layers
whose inputs are not all tensors. Refused: pp > 1 (DeepSpeed's pipeline schedule), TP > 1 layers (their
collectives), ZeRO-3 (parameters gathered by module hooks), dp > 1 (untried) and CPU devices.

A run with graphs trains on one side stream, from moving the model to the device on, and captures on it
(training_stream). Autograd runs each parameter's AccumulateGrad node on the stream it was made on, and a
node made on the default stream that something keeps alive (at ZeRO-1 and ZeRO-2, presumably DeepSpeed's
gradient hooks: on the H200 every ZeRO-1/2 capture failed after the first eager step, ZeRO-0 captures did not)
makes the capture wait on the default stream, which invalidates it ("operation failed due to a previous error
during capture"; torch warns "The AccumulateGrad node's stream does not match ...").

The graphed backward hands autograd its static gradient buffers; a parameter without a gradient would
keep that buffer as its .grad, and the next replay would overwrite it in place (pytorch/pytorch#181723:
two accumulated micro-batches summed wrongly). A hook per parameter gives autograd a copy instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from model_zoo.common import get_mask_answer, mask_answers, put_mask_answers


class TensorArgs(nn.Module):
    """A layer entry as make_graphed_callables wants it: tensors in positionally, a tuple of tensors out (an
    entry that returns one bare tensor, as T5's last decoder layer does, gives a 1-tuple). Outputs that hand an input
    on unchanged (BERT's 2D mask) are left out; GraphedCall puts them back."""

    def __init__(self, entry: nn.Module, passthrough: tuple[int | None, ...]):
        super().__init__()
        self.entry = entry
        self.computed = [k for k, p in enumerate(passthrough) if p is None]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.entry(tuple(tensors))
        out = out if isinstance(out, tuple) else (out,)
        return tuple(out[k] for k in self.computed)


@dataclass
class GraphedCall:
    """One layer's graphed callable and what it was captured for (tuple in, tuple out)."""

    graphed: nn.Module
    passthrough: tuple[int | None, ...]
    answers: list
    signature: list[tuple[torch.Size, torch.dtype, bool]]
    tuple_out: bool = True              # the entry returned a tuple (else one bare tensor)

    def matches(self, inputs: tuple) -> bool:
        """Same shapes, dtypes and requires_grad as captured, and each mask with the captured answer (the
        graph baked in the branch it chose: flash attention when nothing is masked)."""
        if len(inputs) != len(self.signature) or not all(torch.is_tensor(x) for x in inputs):
            return False
        if signature(inputs) != self.signature:
            return False
        return all(a is None or get_mask_answer(x) == a for x, a in zip(inputs, self.answers))

    def __call__(self, inputs: tuple) -> tuple | torch.Tensor:
        computed = iter(self.graphed(*inputs))
        out = tuple(inputs[p] if p is not None else next(computed) for p in self.passthrough)
        return out if self.tuple_out else out[0]


def record_layer_io(modules: list[nn.Module], run) -> list[tuple[tuple, tuple[int | None, ...], bool] | None]:
    """Run `run()` with forward hooks on `modules` (tuple in, a tuple or one tensor out): per module detached
    copies of its inputs at its first call (sample_of; None where one is not a tensor), per output the index
    of the input it hands on unchanged (None: computed), and whether it returned a tuple; None for a module
    that was not called. The hooks are gone afterwards.

    Copies, not the inputs: an input keeps its autograd graph, and with it every earlier parameter's
    AccumulateGrad node, made on the default stream in this eager step. A capture's backward then feeds
    those nodes from the capture stream, syncs with the default stream and the capture fails ("operation
    failed due to a previous error during capture", torch's warning: "The AccumulateGrad node's stream does
    not match the stream of the node that produced the incoming gradient")."""
    seen: list = [None] * len(modules)

    def hook_for(i: int):
        def hook(module: nn.Module, args: tuple, out) -> None:
            if seen[i] is None:
                xs = tuple(args[0])
                outs = out if isinstance(out, tuple) else (out,)
                passthrough = tuple(next((j for j, x in enumerate(xs) if o is x), None) for o in outs)
                kept = sample_of(xs) if all(torch.is_tensor(x) for x in xs) else tuple(
                    None if torch.is_tensor(x) else x for x in xs)
                seen[i] = (kept, passthrough, isinstance(out, tuple))
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def sample_of(xs: tuple) -> tuple[torch.Tensor, ...]:
    """Detached copies with the same requires_grad and mask answers (a layer asks its mask's answer during
    capture; without it it would read it back from the GPU, which a capture cannot)."""
    samples = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in xs)
    put_mask_answers(samples, mask_answers(xs))
    return samples


def capture(modules: list[nn.Module], io: list[tuple[tuple, tuple[int | None, ...], bool]]) -> list[GraphedCall]:
    """A GraphedCall per module from its record_layer_io entry, all from one make_graphed_callables call (one
    memory pool; they must then run in this order, backward in reverse)."""
    wrappers = tuple(TensorArgs(m, passthrough) for m, (_, passthrough, _) in zip(modules, io))
    samples = tuple(xs for xs, _, _ in io)
    # allow_unused_input: an input handed on unchanged and used by nothing else (the decoder embeddings riding
    # through T5's encoder blocks) gets no gradient from the graph, and torch would refuse the capture (every T5
    # capture on the H200, session 20); its gradient reaches it through the passthrough
    graphed = torch.cuda.make_graphed_callables(wrappers, samples, allow_unused_input=True)
    return [GraphedCall(g, passthrough, mask_answers(xs), signature(xs), tuple_out)
            for g, (xs, passthrough, tuple_out) in zip(graphed, io)]


def signature(xs: tuple) -> list[tuple[torch.Size, torch.dtype, bool]]:
    """What GraphedCall.matches compares: each input's shape, dtype and requires_grad."""
    return [(x.shape, x.dtype, x.requires_grad) for x in xs]


def copy_grads_out(modules: list[nn.Module]) -> list:
    """A hook per parameter that gives autograd a copy of the gradient a graph wrote into its static buffer,
    so .grad never aliases that buffer (pytorch/pytorch#181723). One copy of the layers' gradients per
    backward. Returns the handles."""
    return [p.register_hook(torch.clone) for m in modules for p in m.parameters() if p.requires_grad]


def training_stream() -> torch.cuda.Stream:
    """The stream a --cuda-graphs run trains and captures on: torch.cuda.graph's capture stream (which
    make_graphed_callables captures on), made here if torch has not made it yet."""
    if torch.cuda.graph.default_capture_stream is None:
        torch.cuda.graph.default_capture_stream = torch.cuda.Stream()
    return torch.cuda.graph.default_capture_stream


def on_stream(stream: torch.cuda.Stream | None):
    """torch.cuda.stream(stream), or nothing to enter without one (a run without graphs)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def scope_refusal(dp: int, pp: int, zero: int, max_tp: int) -> str | None:
    """Why a layout is outside what --cuda-graphs runs (one GPU, TP 1, ZeRO 0-2), or None. The search asks it
    of candidates (autotune/search.graphable), train.py of plans (graph_refusal)."""
    if pp > 1:
        return f"--cuda-graphs needs pp = 1 (this plan has pp = {pp}); leave it off for pipelined plans"
    if dp > 1:
        return (f"--cuda-graphs is tried on one GPU only (this plan has dp = {dp}: DeepSpeed's gradient "
                "reduction beside the graphs is untested); leave it off for data-parallel plans")
    if zero == 3:
        return "--cuda-graphs does not run under ZeRO-3 (its module hooks gather the parameters); use ZeRO 0-2"
    if max_tp > 1:
        return ("--cuda-graphs needs TP 1 in every layer (a TP layer's collectives are not captured); "
                "leave it off for this plan")
    return None


def plan_refusal(plan) -> str | None:
    """scope_refusal of a Plan's own layout (what train.py graphs of it, whatever the device)."""
    return scope_refusal(plan.dp_deg if plan.world_size else 1, plan.pp_deg, plan.zero_stage,
                         max(plan.tp_sizes_enc, default=1))


def graph_refusal(plan, compile_mode: str | None, cuda: bool) -> str | None:
    """Why --cuda-graphs cannot run this plan (a one-line message naming the fix), or None."""
    if not cuda:
        return "--cuda-graphs needs a CUDA device (CUDA graphs); leave it off on the CPU"
    if compile_mode is not None:
        return "--cuda-graphs and --compile exclude each other; --compile reduce-overhead has graphs of its own"
    return plan_refusal(plan)


@dataclass
class LayerGraphs:
    """The graphable layer entries of the pp = 1 model and their graphs, captured after the first step."""

    slots: list[nn.Module]                      # EntryModule per plain (non-checkpointed) layer
    stream: torch.cuda.Stream | None = None     # training_stream(): where the run trains and captures
    calls: list[GraphedCall | None] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    eager_left: list[str] = field(default_factory=list)    # why a slot stayed eager

    @property
    def captured(self) -> bool:
        return bool(self.calls)

    def record(self, run) -> None:
        """Run one step (`run()`) eager, then capture every slot from the inputs it saw there."""
        io = record_layer_io(self.slots, run)
        keep = [k for k, r in enumerate(io) if r is not None and all(torch.is_tensor(x) for x in r[0])]
        self.eager_left = [f"layer entry {k}: " + ("not called" if io[k] is None else "inputs not all tensors")
                           for k in range(len(io)) if k not in keep]
        self.calls = [None] * len(self.slots)
        if not keep:
            return
        torch.cuda.synchronize()
        try:
            calls = capture([self.slots[k] for k in keep], [io[k] for k in keep])
        except RuntimeError as exc:
            raise RuntimeError(f"CUDA graph capture of the layers failed ({str(exc).splitlines()[0]}); "
                               "run without --cuda-graphs") from exc
        for k, call in zip(keep, calls):
            self.calls[k] = call
            self.slots[k].graphed = call
        self.hooks = copy_grads_out([self.slots[k] for k in keep])

    def summary(self) -> str:
        n = sum(c is not None for c in self.calls)
        return f"CUDA graphs: {n} of {len(self.slots)} plain layers graphed" + (
            f" ({'; '.join(self.eager_left)})" if self.eager_left else "")
