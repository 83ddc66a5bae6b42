"""Per-layer tensor parallelism: layers with different TP degrees or rank layouts in one model.

Inside a pipeline stage of B ranks (stage-local index j = 0..B-1) every rank owns a fixed *fine
slice* of each micro-batch: slice j of B equal slices. A layer whose TP group G has members
g_0..g_{t-1} (ascending ranks = group order) works on the concatenation of its members' fine
slices, so the t ranks of G hold the same activations, as Megatron's TP layers expect. Where the
layout changes (between two layers, between the embeddings/head in the vocabulary layout and a
layer, or at a pipeline stage boundary) `Redistribute` keeps the rank's own fine slice of the old
layout and all-gathers the new group's slices; pipeline stages exchange fine slices, so every rank
of a stage sends and receives the same shapes.

Scaling. A TP group's loss is the mean over its samples, L_G = (1/t) sum_{j in G} l_j. Every
member of G holds dL_G/dx for all of G's samples (TP layers all-reduce input gradients). Backward of
a layout change from G (size t) to G' (size t') takes the own slice of dL_G'/dx_new, scales it by
t'/t (a power of two: exact) and all-gathers it over G, which is dL_G/dx_old. A parameter of layer
l then receives on every rank the gradient of its group's loss; the B/t_l ranks that hold the same
shard (the layer's "data-parallel" group D_l: one member per group) average it, which is the
gradient of the global mean loss.

DeepSpeed gets one data-parallel group D for all parameters: the ranks that hold the same shard in
every layer of every stage (its ZeRO partitions and all-reduces need identical parameters).
Gradients of a layer whose D_l is larger than D are averaged over D_l by a hook on the parameter that
runs before the gradient is accumulated (so before DeepSpeed sees it); DeepSpeed's own averaging
over D (a subgroup of D_l) is then exact too. With only consecutive (or only strided) layouts D has
B / max TP ranks; with both kinds of layout of TP > 1 in one plan it is a single rank, since
DeepSpeed's pipeline grid (and its checkpoint file names) knows one "model" axis only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autotune.plan import Plan, PlanError


# ---------------------------------------------------------------------------------------------- pure layout math
@dataclass(frozen=True)
class Layout:
    """A TP degree and rank layout inside a stage of `B` ranks (consecutive or strided groups)."""

    tp: int
    consecutive: bool = True

    @staticmethod
    def make(tp: int, consecutive: bool, B: int) -> "Layout":
        # TP 1 and TP = B have one layout only; call it consecutive so equal layouts compare equal
        return Layout(tp, True if tp in (1, B) else bool(consecutive))

    def position(self, j: int, B: int) -> int:
        """Rank of stage-local index j inside its TP group."""
        return j % self.tp if self.consecutive else j // (B // self.tp)

    def members(self, j: int, B: int) -> list[int]:
        """Stage-local indices of j's TP group in group order (ascending)."""
        if self.consecutive:
            base = j - j % self.tp
            return [base + k for k in range(self.tp)]
        d = B // self.tp
        return [j % d + d * k for k in range(self.tp)]

    def replicas(self, j: int, B: int) -> list[int]:
        """Stage-local indices holding the same shard as j (the layer's data-parallel group D_l)."""
        p = self.position(j, B)
        return [k for k in range(B) if self.position(k, B) == p]

    def groups(self, B: int) -> list[list[int]]:
        return sorted({tuple(self.members(j, B)) for j in range(B)})

    def dp_groups(self, B: int) -> list[list[int]]:
        return sorted({tuple(self.replicas(j, B)) for j in range(B)})


def grid_dims(layouts, B: int) -> tuple[list[str], list[int]]:
    """(axes, dims) of one stage of DeepSpeed's topology for these layouts (see LayerwiseLayout.grid)."""
    t_cons = max([x.tp for x in layouts if x.consecutive] + [1])
    t_str = max([x.tp for x in layouts if not x.consecutive] + [1])
    if t_str == 1:
        return ["data", "model"], [B // t_cons, t_cons]
    if t_cons == 1:
        return ["model", "data"], [t_str, B // t_str]
    return ["data", "model"], [1, B]


def vocab_layout(layers, vtp: int, B: int) -> Layout:
    """Embeddings and heads take the layout of the first (else last) layer if it has TP vtp (no
    relayout there), else consecutive groups."""
    for x in (layers[0], layers[-1]) if layers else ():
        if x.tp == vtp:
            return x
    return Layout.make(vtp, True, B)


def zero_group_size(layer_layouts: list[tuple[int, bool]], vtp: int, B: int) -> int:
    """Ranks DeepSpeed's data-parallel group (what ZeRO shards over) has for a plan whose layers have
    these (tp, consecutive) layouts on stages of B ranks: B / max TP, or 1 with both kinds of layout."""
    layers = [Layout.make(t, c, B) for t, c in layer_layouts]
    axes, dims = grid_dims(set(layers) | {vocab_layout(layers, vtp, B)}, B)
    return dims[axes.index("data")]


def needs_layerwise(plan: Plan) -> bool:
    """Plans the uniform runtime cannot run: per-layer TP degrees or layouts, or vtp != layer TP."""
    return not plan.uniform_tp or (plan.num_layers > 0 and plan.vtp != plan.tp_sizes_enc[0])


@dataclass(frozen=True)
class LayerwiseLayout:
    """Every layout of a layer-wise plan, per stage, and the DeepSpeed grid that fits them all."""

    world: int
    pp: int
    layers: tuple[Layout, ...]       # per Transformer layer
    vocab: Layout                    # embeddings and heads (one layout: tied weights sit on both ends)
    stage_of_layer: tuple[int, ...]

    @classmethod
    def from_plan(cls, plan: Plan) -> "LayerwiseLayout":
        W, pp = plan.world_size, plan.pp_deg
        B = W // pp
        layers = tuple(Layout.make(t, bool(c), B) for t, c in zip(plan.tp_sizes_enc, plan.tp_consecutive_flags))
        return cls(W, pp, layers, vocab_layout(layers, plan.vtp, B), tuple(plan.stage_of_layer()))

    @property
    def B(self) -> int:
        return self.world // self.pp

    @property
    def all_layouts(self) -> list[Layout]:
        return sorted(set(self.layers) | {self.vocab}, key=lambda x: (x.tp, not x.consecutive))

    def grid(self) -> tuple[list[str], list[int]]:
        """(axes, dims) of DeepSpeed's ProcessTopology: 'data' indexes the ranks holding identical
        parameters in every layer (DeepSpeed's data-parallel group D), 'model' the rest of a stage."""
        axes, dims = grid_dims(self.all_layouts, self.B)
        return ["pipe"] + axes, [self.pp] + dims

    @property
    def zero_dp(self) -> int:
        """Size of DeepSpeed's data-parallel group D (what ZeRO shards over)."""
        axes, dims = self.grid()
        return dims[axes.index("data")]

    def data_index(self, j: int) -> int:
        axes, dims = self.grid()
        if axes[1] == "data":                  # [pipe, data, model]
            return j // dims[2]
        return j % dims[2]                     # [pipe, model, data]

    def model_index(self, j: int) -> int:
        axes, dims = self.grid()
        return j % dims[2] if axes[1] == "data" else j // dims[2]

    def layout_of(self, layer: int | None) -> Layout:
        return self.vocab if layer is None else self.layers[layer]

    def check(self, plan: Plan) -> None:
        """Plan properties the layer-wise runtime needs, with the fix in the message."""
        B = self.B
        if plan.zero_stage == 3:
            raise PlanError("zero_stage=3 with per-layer TP degrees: ZeRO-3 partitions every parameter over one "
                            "data-parallel group, but layers of different TP need different groups; use zero_stage 2 "
                            "(or 0/1), or one TP degree for all layers")
        if plan.global_bsz % (plan.chunks * B):
            raise PlanError(f"plan key 'global_bsz'={plan.global_bsz}: with per-layer TP every rank of a pipeline "
                            f"stage takes 1/{B} of each of the {plan.chunks} micro-batches; use a multiple of "
                            f"chunks*{B}={plan.chunks * B}")


def check_sequence(seq, lw: LayerwiseLayout) -> None:
    """Runs of layers that pass TP-sharded state to each other (LayerSequence.meta['same_tp_layout'],
    e.g. T5's position bias, split by heads) must share one layout."""
    for start, end in seq.meta.get("same_tp_layout", []):
        if len(set(lw.layers[start:end])) > 1:
            raise PlanError(f"layers {start}-{end - 1} pass tensors split by attention head to each other, so they "
                            f"need one TP degree and layout; set one tp_sizes_enc / tp_consecutive_flags value "
                            f"for them")


def shard_owner(lw: LayerwiseLayout, layout: Layout | None, j: int) -> bool:
    """Whether stage-local rank j counts a parameter in the global gradient norm.

    DeepSpeed sums per-rank norms over its model-parallel group: the ranks with the same 'data'
    index, one per class of identical ranks. Among those of a stage, several may hold the same
    shard of a layer (or the same replicated parameter, `layout` None); the first of them counts it.
    """
    B = lw.B
    d = lw.data_index(j)
    mates = [k for k in range(B) if lw.data_index(k) == d]
    key = (lambda k: 0) if layout is None else (lambda k: layout.position(k, B))
    return next(k for k in mates if key(k) == key(j)) == j


# ---------------------------------------------------------------------------------------------- process groups
class GroupCache:
    """One process group per distinct rank set; every rank creates every group in the same order."""

    def __init__(self):
        self.groups: dict[tuple[int, ...], Any] = {}

    def get(self, ranks: list[int]) -> Any:
        key = tuple(sorted(ranks))
        if key not in self.groups:
            self.groups[key] = dist.new_group(list(key))
        return self.groups[key]


@dataclass
class RankGroups:
    """This rank's groups for a layer-wise plan."""

    lw: LayerwiseLayout
    j: int                           # stage-local index
    stage: int
    tp: dict[Layout, Any]            # layout -> this rank's TP group
    replicas: dict[Layout, Any]      # layout -> this rank's D_l group
    dp_group: Any                    # DeepSpeed's data-parallel group D
    mp_group: Any                    # ranks with this rank's 'data' index (gradient-norm sums)
    model_group: Any                 # those of them in this stage (DeepSpeed's "tensor"/"slice" axis)

    def layer_group(self, i: int) -> Any:
        return self.tp[self.lw.layers[i]]


def build_rank_groups(lw: LayerwiseLayout, rank: int) -> RankGroups:
    """Create (collectively) the TP and replica groups of every layout on every stage, D and the
    model-parallel groups; return this rank's."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    B = lw.B
    cache = GroupCache()
    stage, j = divmod(rank, B)

    def own(rank_lists: list[list[int]]) -> Any:
        """Create (collectively) every group of the list; return the one holding this rank."""
        found = None
        for ranks in rank_lists:
            g = cache.get(ranks)
            found = g if rank in ranks else found
        return found

    def on_every_stage(lists: list[list[int]]) -> list[list[int]]:
        return [[k * B + m for m in members] for k in range(lw.pp) for members in lists]

    tp = {layout: own(on_every_stage(layout.groups(B))) for layout in lw.all_layouts}
    replicas = {layout: own(on_every_stage(layout.dp_groups(B))) for layout in lw.all_layouts}
    topo = ProcessTopology(*lw.grid())
    dp_group = own(topo.get_axis_comm_lists("data"))
    model_group = own(topo.get_axis_comm_lists("model"))
    mp_group = own([topo.get_axis_list("data", d) for d in range(topo.get_dim("data"))])
    return RankGroups(lw, j, stage, tp, replicas, dp_group, mp_group, model_group)


# ---------------------------------------------------------------------------------------------- redistribution
@dataclass(frozen=True)
class Side:
    """One side of a layout change: the group (None: this rank alone, the fine-slice layout) and its size."""

    group: Any
    size: int
    position: int


def _gather(x: torch.Tensor, side: Side) -> torch.Tensor:
    if side.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(side.size)]
    dist.all_gather(parts, x.contiguous(), group=side.group)
    return torch.cat(parts, dim=0)


class _Redistribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, src: Side, dst: Side, fine: int) -> torch.Tensor:
        ctx.src, ctx.dst, ctx.fine = src, dst, fine
        return _gather(x.narrow(0, src.position * fine, fine), dst)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        own = grad.narrow(0, ctx.dst.position * ctx.fine, ctx.fine) * (ctx.dst.size / ctx.src.size)
        return _gather(own, ctx.src), None, None, None


def redistribute(x: torch.Tensor, src: Side, dst: Side, fine: int) -> torch.Tensor:
    """Batch layout `src` -> `dst` (dim 0): keep the own fine slice, gather the new group's slices."""
    if x.dim() == 0 or x.size(0) != src.size * fine:
        raise RuntimeError(f"per-layer TP re-lays out every tensor passed between layers along dim 0 (the batch); "
                           f"a tensor of shape {tuple(x.shape)} does not have {src.size * fine} samples there "
                           f"(batch-independent tensors, e.g. T5's shared position bias, cannot cross a TP change): "
                           f"use one TP layout for such layers")
    if x.is_floating_point() and x.requires_grad:
        return _Redistribute.apply(x, src, dst, fine)
    with torch.no_grad():
        return _gather(x.narrow(0, src.position * fine, fine), dst)


class Relayout(nn.Module):
    """Runs `inner` with its inputs moved from layout `before[0]` to `before[1]`, and its output from
    `after[0]` to `after[1]` (either may be None: no change). Tuples are re-laid out element-wise."""

    def __init__(self, inner: nn.Module, fine: int, before: tuple[Side, Side] | None = None,
                 after: tuple[Side, Side] | None = None):
        super().__init__()
        self.inner, self.fine, self.before, self.after = inner, fine, before, after

    def _move(self, x: Any, sides: tuple[Side, Side] | None) -> Any:
        if sides is None:
            return x
        if torch.is_tensor(x):
            return redistribute(x, sides[0], sides[1], self.fine)
        return tuple(redistribute(t, sides[0], sides[1], self.fine) for t in x)

    def forward(self, inputs: Any) -> Any:
        return self._move(self.inner(self._move(inputs, self.before)), self.after)


def side(rg: RankGroups, layout: Layout | None) -> Side:
    """The group of `layout` on this rank (None: the fine-slice layout of a stage boundary)."""
    if layout is None:
        return Side(None, 1, 0)
    return Side(rg.tp[layout], layout.tp, layout.position(rg.j, rg.lw.B))


def layer_relayout(rg: RankGroups, i: int) -> tuple[tuple | None, tuple | None]:
    """(before, after) layout changes of Transformer layer i.

    Layer 0 starts from the vocabulary layout (embeddings), the last layer ends in it (head). A stage
    boundary sends the fine slices when the layouts on its two sides differ, else the group's layout
    as it is (so batch-independent tensors can cross a stage boundary inside a uniform stretch).
    """
    lw = rg.lw
    n, stage_of = len(lw.layers), lw.stage_of_layer
    cur = lw.layers[i]
    if i == 0:
        prev = lw.vocab
    elif stage_of[i] != stage_of[i - 1]:
        prev = None if lw.layers[i - 1] != cur else cur
    else:
        prev = lw.layers[i - 1]
    if i == n - 1:
        nxt = lw.vocab
    elif stage_of[i] != stage_of[i + 1]:
        nxt = None if lw.layers[i + 1] != cur else cur
    else:
        nxt = cur   # the next layer's `before` does it
    before = None if prev == cur else (side(rg, prev), side(rg, cur))
    after = None if nxt == cur else (side(rg, cur), side(rg, nxt))
    return before, after


def fine_size(plan: Plan) -> int:
    return plan.global_bsz // (plan.chunks * (plan.world_size // plan.pp_deg))


def wrap_layer(module: nn.Module, i: int, rg: RankGroups | None, plan: Plan) -> nn.Module:
    """Layer i's module with its layout changes (unchanged for uniform plans, rg None)."""
    if rg is None:
        return module
    before, after = layer_relayout(rg, i)
    if before is None and after is None:
        return module
    return Relayout(module, fine_size(plan), before, after)


# ---------------------------------------------------------------------------------------------- gradients
def param_layouts(seq) -> dict[int, tuple[nn.Parameter, int | None]]:
    """id(param) -> (param, layer index or None for the embeddings/heads) over the layer sequence."""
    out: dict[int, tuple[nn.Parameter, int | None]] = {}
    for e in seq.embed + seq.head:
        for p in e.module.parameters():
            out.setdefault(id(p), (p, None))
    for i, e in enumerate(seq.layers):
        for p in e.module.parameters():
            out[id(p)] = (p, i)
    return out


def _average_hook(group: Any, size: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        out = grad / size
        dist.all_reduce(out, group=group)
        return out
    return hook


def prepare_gradients(seq, rg: RankGroups) -> None:
    """Before deepspeed.initialize: average each layer's gradient contributions over its replica group
    D_l where that is more than DeepSpeed's group D, and tag gradient-norm owners (see shard_owner)."""
    lw = rg.lw
    dp_ranks = sorted(dist.get_process_group_ranks(rg.dp_group))
    averaged = {layout: g for layout, g in rg.replicas.items()      # layouts whose D_l is more than D
                if g.size() > 1 and sorted(dist.get_process_group_ranks(g)) != dp_ranks}
    end_stage = rg.stage in (0, lw.pp - 1)                         # embeddings and heads live there
    for p, layer in param_layouts(seq).values():
        if not (end_stage if layer is None else lw.stage_of_layer[layer] == rg.stage):
            continue
        layout = lw.layout_of(layer)
        if layout in averaged:
            p.register_hook(_average_hook(averaged[layout], averaged[layout].size()))
        sharded = bool(getattr(p, "tensor_model_parallel", False)) and layout.tp > 1
        p.galvatron_norm_owner = shard_owner(lw, layout if sharded else None, rg.j)


def tag_layerwise_owners(module: nn.Module) -> None:
    """Gradient-norm tags for DeepSpeed (after PipelineModule marked the replicated tied copies)."""
    for p in module.parameters():
        owner = getattr(p, "galvatron_norm_owner", True) and not getattr(p, "ds_pipe_replicated", False)
        p.model_parallel = owner
        if not owner:
            p.tensor_model_parallel = False
