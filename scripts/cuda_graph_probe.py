"""Does capturing each Transformer layer's eager kernels in CUDA graphs take the host's launch cost off a
one-GPU training step?

    python scripts/cuda_graph_probe.py --models vit-large:16,32,64 bert-large:8,16,32 --steps 20 --out graphs.jsonl
    python scripts/cuda_graph_probe.py --device cpu --models vit-test:2 bert-test:2 --steps 2 --out /tmp/g.jsonl

Our one-GPU steps are launch-bound: the host queues kernels more slowly than the GPU runs them. Graphs
built by torch.cuda.make_graphed_callables (no torch.compile) replay exactly the eager kernels of each
layer with one launch per layer and pass, so the GPU lines of the model profiles (eager kernels) stay
valid; only the host's share changes. Per model and micro-batch: the runtime's layer sequence (train.py's
pp=1 forward, without DeepSpeed) in bf16 with dropout 0, --steps forward + backward steps after 3 warm-up
steps, first eager, then with every Transformer layer entry replaced by a graphed callable (one
make_graphed_callables call over all layers: one shared memory pool, so the layers run in capture order).
Per step: wall time (synchronised on both sides), host queue time (until backward() returned) and GPU time
(CUDA events); peak memory per mode. Correctness on fixed batches: loss and every parameter's gradient,
eager against graphed, for one pass and for two accumulated passes without zero_grad between them (the
graphed backward returns its static gradient buffers; autograd keeps one as param.grad when it has none
yet, and the next replay overwrites it in place, pytorch/pytorch#181723). So the graphed mode puts a hook
on every parameter of a graphed layer that hands autograd a copy of its gradient (`--no-grad-copy` leaves
it off, to show the bug: the accumulation numbers). Beside the times, the GPU time the model profile's
lines predict for the step (every layer's and the embeddings'/head's fwd + bwd GPU line, `--profiles`):
a graphed step that no longer waits for the host should take that. Gradient
differences are ||g_graphed - g_eager|| / ||g_eager|| over all parameters and its max over single ones;
`eager_repeat` is eager against eager, the floor of those numbers. Prints one line and writes one JSON line per (model, batch); --device cpu runs
the eager path only (a smoke run: no graphs on the CPU)."""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from autotune.model_profile import ModelProfile, ProfileError  # noqa: E402
from autotune.plan import write_jsonl_atomic  # noqa: E402
from backends.deepspeed.graphs import GraphedCall, capture, copy_grads_out, record_layer_io  # noqa: E402
from backends.gc_pause import automatic_gc_off  # noqa: E402
from model_zoo.adapter import LayerSequence, run_sequence  # noqa: E402
from model_zoo.common import carry_mask_answer  # noqa: E402
from model_zoo.registry import PRESETS, load_hf_config  # noqa: E402
from model_zoo.runtime import get_adapter  # noqa: E402

WARMUP = 3
FAMILIES = ("vit", "bert")
DEFAULT_MODELS = ["vit-large:16,32,64", "bert-large:8,16,32"]


def failure(exc: Exception) -> dict:
    """What a failed mode leaves in its row: the error and where it was raised."""
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=-6)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(seq: LayerSequence, inputs: tuple, labels: torch.Tensor) -> torch.Tensor:
    loss = seq.loss_fn(run_sequence(seq.entries, inputs), labels)
    loss.backward()
    return loss


def device_batch(adapter: Any, config: Any, model: str, b: int, step: int, device: torch.device) -> tuple:
    """(inputs, labels) of synthetic step `step` on the device, as train.py moves them: floating inputs in
    the model's dtype, masks with the host's answer to "does it mask anything"."""
    preset = PRESETS[model]
    batch = adapter.synthetic_batch(config, preset.task, b, seed=0, step=step, seq_len=preset.seq_len)
    inputs, labels = adapter.split_batch(batch, preset.task)
    inputs = tuple(x.to(device, torch.bfloat16) if x.is_floating_point() else carry_mask_answer(x, x.to(device))
                   for x in inputs)
    return inputs, labels.to(device)


def median(xs: list[float] | None) -> float | None:
    return statistics.median(xs) if xs else None


def timed_steps(net: nn.Module, seq: LayerSequence, inputs: tuple, labels: torch.Tensor, steps: int,
                device: torch.device) -> dict:
    """WARMUP + steps steps; per timed step wall, host queue and GPU ms; peak memory from the first step."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    wall: list[float] = []
    host: list[float] = []
    events = []
    for i in range(WARMUP + steps):
        net.zero_grad(set_to_none=True)
        ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        sync(device)
        t0 = time.perf_counter()
        if ev:
            ev[0].record()
        forward_backward(seq, inputs, labels)
        t1 = time.perf_counter()
        if ev:
            ev[1].record()
        sync(device)
        t2 = time.perf_counter()
        if i >= WARMUP:
            wall.append((t2 - t0) * 1e3)
            host.append((t1 - t0) * 1e3)
            if ev:
                events.append(ev)
    gpu = [a.elapsed_time(b) for a, b in events] if cuda else None
    return {"wall_ms": wall, "host_ms": host, "gpu_ms": gpu, "wall_median": median(wall),
            "host_median": median(host), "gpu_median": median(gpu),
            "peak_alloc_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None}


def capture_sequence(seq: LayerSequence, inputs: tuple) -> list[GraphedCall]:
    """A GraphedCall per layer entry from one eager forward's layer inputs (one make_graphed_callables call)."""
    modules = [e.module for e in seq.layers]
    io = record_layer_io(modules, lambda: run_sequence(seq.entries, inputs))
    return capture(modules, io)


def use(seq: LayerSequence, modules: list) -> None:
    """Put `modules` (eager layers or GraphedCalls) in the layer entries."""
    for entry, module in zip(seq.layers, modules):
        entry.module = module


def predicted_ms(profile: ModelProfile | None, b: int) -> dict | None:
    """The profile's (host, GPU) ms of one forward + backward at micro-batch b, summed over every layer
    and the embeddings/head at TP 1 (TimeFit.parts, no calibration): the host's launch floors and the GPU
    lines apart. None without a profile or where it lacks an entry."""
    if profile is None:
        return None
    host = gpu = 0.0
    for lt in profile.layer_types.values():
        for kind in ("fwd", "bwd"):
            parts = profile.layer_time_parts_ms(lt.name, 1, b, kind)
            if parts is None:
                return None
            host, gpu = host + lt.count * parts[0], gpu + lt.count * parts[1]
    for part in ("first", "last"):
        for kind in ("fwd", "bwd"):
            parts = profile.other_time_parts_ms(part, 1, b, kind)
            if parts is None:
                return None
            host, gpu = host + parts[0], gpu + parts[1]
    return {"host_ms": host, "gpu_ms": gpu, "profile": profile.source.get("command") if isinstance(
        profile.source, dict) else None}


def load_profile(folder: str | None, model: str) -> ModelProfile | None:
    """The bf16 profile of `model` in `folder`, or None (no folder, no file, or one that cannot be read)."""
    path = os.path.join(folder, f"{model}.json") if folder else None
    if not path or not os.path.isfile(path):
        return None
    try:
        profile = ModelProfile.load(path)
    except ProfileError as exc:
        print(f"[probe] {path} not used: {exc}", file=sys.stderr)
        return None
    return profile if profile.precision == "bf16" else None


def grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def grad_rel(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    """||got - ref|| / ||ref|| over all parameters together ("all"), and its max over single parameters
    ("max", "worst": which). A parameter whose true gradient is zero (BERT's key biases: softmax ignores
    them) has a max of pure rounding noise, so "all" is the number to judge by; inf where one side lacks one."""
    if got.keys() != ref.keys():
        return {"all": float("inf"), "max": float("inf"), "worst": sorted(got.keys() ^ ref.keys())[0]}
    num = den = worst = 0.0
    name = None
    for n, r in ref.items():
        d, g = (got[n].float() - r.float()).norm().item(), r.float().norm().item()
        num, den = num + d * d, den + g * g
        if d and d / max(g, 1e-30) > worst:
            worst, name = d / max(g, 1e-30), n
    return {"all": (num / max(den, 1e-60)) ** 0.5, "max": worst, "worst": name}


def correctness(net: nn.Module, seq: LayerSequence, eager: list[nn.Module], graphed: list,
                one: tuple, two: list[tuple]) -> dict:
    """Loss and gradients, graphed against eager: one pass of batch `one`; two accumulated passes of `two`."""
    def run(modules: list, batches: list[tuple]) -> tuple[list[float], dict[str, torch.Tensor]]:
        use(seq, modules)
        net.zero_grad(set_to_none=True)
        losses = [forward_backward(seq, *b).item() for b in batches]
        return losses, grads(net)

    def loss_rel(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))

    try:
        l_e, g_e = run(eager, [one])
        l_r, g_r = run(eager, [one])
        l_g, g_g = run(graphed, [one])
        out: dict[str, Any] = {"loss_rel": loss_rel(l_g, l_e), "grad_rel": grad_rel(g_g, g_e),
                               "eager_repeat_loss_rel": loss_rel(l_r, l_e), "eager_repeat_grad_rel": grad_rel(g_r, g_e)}
        del g_e, g_r, g_g
        la_e, ga_e = run(eager, two)
        la_g, ga_g = run(graphed, two)
        out.update(accum_loss_rel=loss_rel(la_g, la_e), accum_grad_rel=grad_rel(ga_g, ga_e))
        floor = max(out["grad_rel"]["all"], out["eager_repeat_grad_rel"]["all"])
        out["accum_mismatch"] = out["accum_grad_rel"]["all"] > max(1e-2, 10 * floor)
        return out
    finally:
        use(seq, graphed)
        net.zero_grad(set_to_none=True)


def bench(model: str, batches: list[int], steps: int, device: torch.device, grad_copy: bool = True,
          profiles: str | None = None) -> list[dict]:
    preset = PRESETS[model]
    profile = load_profile(profiles, model)
    config = load_hf_config(model)
    adapter = get_adapter(config.model_type)
    adapter.set_dropout(config, 0.0)
    net = adapter.build_model(config, preset.task).to(device, torch.bfloat16)
    seq = adapter.layer_sequence(net, preset.task)
    eager = [e.module for e in seq.layers]
    rows = []
    for b in batches:
        inputs, labels = device_batch(adapter, config, model, b, 0, device)
        row: dict[str, Any] = {"model": model, "batch": b, "steps": steps, "device": str(device),
                               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                               "torch": torch.__version__, "layers": len(seq.layers),
                               "grad_copy": grad_copy, "predicted": predicted_ms(profile, b),
                               "eager": None, "graphed": None, "graphed_reason": None, "check": None}
        with automatic_gc_off():
            try:
                row["eager"] = timed_steps(net, seq, inputs, labels, steps, device)
            except Exception as exc:  # noqa: BLE001 - recorded in the row, next mode
                row["eager"] = failure(exc)
            net.zero_grad(set_to_none=True)
            if device.type != "cuda":
                row["graphed_reason"] = "CUDA graphs need a GPU (--device cpu: eager path only)"
            else:
                graphed: list = []
                hooks: list = []
                try:
                    torch.cuda.empty_cache()
                    t0 = time.perf_counter()
                    graphed = capture_sequence(seq, inputs)
                    capture_s = time.perf_counter() - t0
                    hooks = copy_grads_out(eager) if grad_copy else []
                    use(seq, graphed)
                    row["graphed"] = timed_steps(net, seq, inputs, labels, steps, device)
                    row["graphed"]["capture_s"] = capture_s
                except Exception as exc:  # noqa: BLE001
                    row["graphed"] = failure(exc)
                if graphed:
                    try:
                        row["check"] = correctness(net, seq, eager, graphed,
                                                   device_batch(adapter, config, model, b, 1, device),
                                                   [device_batch(adapter, config, model, b, s, device)
                                                    for s in (2, 3)])
                    except Exception as exc:  # noqa: BLE001
                        row["check"] = failure(exc)
                for h in hooks:
                    h.remove()
                use(seq, eager)
                net.zero_grad(set_to_none=True)
                del graphed
                gc.collect()
                torch.cuda.empty_cache()
        e, g = row["eager"], row["graphed"]
        ok = e is not None and g is not None and "error" not in e and "error" not in g
        for k in ("wall", "host", "gpu"):
            row[f"speedup_{k}"] = (e[f"{k}_median"] / g[f"{k}_median"]
                                   if ok and e[f"{k}_median"] and g[f"{k}_median"] else None)
        print(summary(row), flush=True)
        rows.append(row)
    del net, seq, eager
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def summary(row: dict) -> str:
    def mode(m: dict | None, reason: str | None) -> str:
        if m is None:
            return f"skipped ({reason})" if reason else "-"
        if "error" in m:
            return f"ERROR {m['error'][:160]}"
        mem = m["peak_alloc_bytes"]
        return (f"wall {fmt(m['wall_median'])} host {fmt(m['host_median'])} gpu {fmt(m['gpu_median'])} ms"
                + (f" peak {mem / 2**30:.2f} GiB" if mem else ""))

    g = row["graphed"]
    line = (f"{row['model']:10s} b={row['batch']:<3d} eager: {mode(row['eager'], None)} | graphed: "
            f"{mode(row['graphed'], row['graphed_reason'])}")
    if row["speedup_wall"]:
        line += f" | x{row['speedup_wall']:.3f} wall, x{fmt(row['speedup_gpu'], '.3f')} gpu"
    pred = row["predicted"]
    if pred:
        line += f" | profile: host {pred['host_ms']:.2f} gpu {pred['gpu_ms']:.2f} ms"
        if g and "error" not in g and g["wall_median"]:
            line += f" (graphed wall {100 * (g['wall_median'] / pred['gpu_ms'] - 1):+.1f} %)"
    c = row["check"]
    if c and "error" in c:
        line += f" | check ERROR {c['error'][:160]}"
    elif c:
        line += (f" | loss {c['loss_rel']:.1e} grad {c['grad_rel']['all']:.1e} (eager repeat "
                 f"{c['eager_repeat_grad_rel']['all']:.1e}) accum grad {c['accum_grad_rel']['all']:.1e}"
                 + (" ACCUMULATION MISMATCH" if c["accum_mismatch"] else ""))
    return line


def parse_models(items: list[str]) -> list[tuple[str, list[int]]] | str:
    """[(preset, batches)] or the error message."""
    out = []
    for item in items:
        model, _, bs = item.partition(":")
        if model not in PRESETS or PRESETS[model].family not in FAMILIES:
            return f"{model!r} is no vit or bert preset; give e.g. vit-large:16,32 bert-large:8"
        try:
            batches = [int(x) for x in (bs or "8").split(",")]
        except ValueError:
            return f"bad micro-batch sizes in {item!r}; give model:batch,batch (e.g. bert-large:8,16)"
        if not batches or min(batches) < 1:
            return f"bad micro-batch sizes in {item!r}; give positive integers"
        out.append((model, batches))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help="model:batch,batch ... (presets of the vit and bert families)")
    ap.add_argument("--steps", type=int, default=20, help=f"timed steps per mode (after {WARMUP} warm-up)")
    ap.add_argument("--device", default="cuda",
                    help="cuda (what it is for) or cpu (a smoke run: eager only, nothing to measure)")
    ap.add_argument("--profiles", default=os.path.join("profiles", "h200"),
                    help="folder of bf16 model profiles (<model>.json) whose GPU lines each row is set beside; "
                         "'' for none")
    ap.add_argument("--no-grad-copy", action="store_true",
                    help="graphed layers without the gradient-copy hooks (shows pytorch/pytorch#181723)")
    ap.add_argument("--out", required=True, help="JSON lines to write")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cuda_graph_probe: error: needs a GPU (CUDA graphs and launch costs are CUDA's); "
              "run it on a GPU machine or give --device cpu for a smoke run", file=sys.stderr)
        return 2
    models = parse_models(args.models)
    if isinstance(models, str):
        print(f"cuda_graph_probe: error: {models}", file=sys.stderr)
        return 2
    if args.profiles and not os.path.isdir(args.profiles):
        print(f"cuda_graph_probe: error: --profiles {args.profiles} is no folder; give a folder of model "
              "profiles (e.g. profiles/h200) or '' for none", file=sys.stderr)
        return 2
    if args.steps < 1:
        print("cuda_graph_probe: error: --steps must be at least 1", file=sys.stderr)
        return 2
    rows = []
    for model, batches in models:
        rows += bench(model, batches, args.steps, device, grad_copy=not args.no_grad_copy,
                      profiles=args.profiles or None)
    write_jsonl_atomic(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
