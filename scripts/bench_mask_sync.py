"""A/B of the runtime layers' padding mask on one GPU: HF's create_bidirectional_mask in every layer (which
reads back from the GPU whether the mask masks anything: a host synchronisation per layer) against
model_zoo.common.layer_padding_mask (that read-back once per micro-batch).

    python scripts/bench_mask_sync.py --models bert-large:8,32 t5-large:8,16 --steps 12 --out results.jsonl

One process per model: the runtime's layer sequence (train.py's pp=1 forward, without DeepSpeed) in bf16,
forward + backward of synthetic batches (BERT unpadded, T5 padded sources, as train.py's synthetic data),
optionally padded (`--pad`: the last 10 % of every other sample's tokens). The two mask builders alternate
step by step on the same model and inputs, so the host's drift hits both alike; medians of --steps steps
each after 3 warm-up steps, with automatic GC off as in train.py. Prints a table and writes one JSON line
per (model, batch, padding)."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers.masking_utils import create_bidirectional_mask  # noqa: E402

from autotune.plan import write_jsonl_atomic  # noqa: E402
from backends.gc_pause import automatic_gc_off  # noqa: E402
from model_zoo.adapter import run_sequence  # noqa: E402
from model_zoo.registry import PRESETS, load_hf_config  # noqa: E402
from model_zoo.runtime import get_adapter  # noqa: E402


def hf_per_layer(config, inputs_embeds, attention_mask, encoder_hidden_states=None):
    """What the layers did before: HF's function, with its read-back, in every layer."""
    return create_bidirectional_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     encoder_hidden_states=encoder_hidden_states)


def step(seq, inputs, labels) -> None:
    loss = seq.loss_fn(run_sequence(seq.entries, inputs), labels)
    loss.backward()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model: str, batches: list[int], steps: int, pad: bool, device: torch.device) -> list[dict]:
    preset = PRESETS[model]
    config = load_hf_config(model)
    adapter = get_adapter(config.model_type)
    net = adapter.build_model(config, preset.task).to(device, torch.bfloat16 if device.type == "cuda" else None)
    seq = adapter.layer_sequence(net, preset.task)
    mod = sys.modules[type(adapter).__module__]     # model_zoo/<family>/model.py, whose layers call the builder
    ours = mod.layer_padding_mask
    rows = []
    for b in batches:
        batch = adapter.synthetic_batch(config, preset.task, b, seed=0, step=0, seq_len=preset.seq_len)
        if pad:
            batch["attention_mask"][::2, -max(1, batch["attention_mask"].shape[1] // 10):] = 0
        batch = {k: v.to(device) for k, v in batch.items()}
        times: dict[str, list[float]] = {"hf_per_layer": [], "once_per_micro_batch": []}
        with automatic_gc_off():
            for i in range(2 * (steps + 3)):
                name = "hf_per_layer" if i % 2 == 0 else "once_per_micro_batch"
                mod.layer_padding_mask = hf_per_layer if name == "hf_per_layer" else ours
                inputs, labels = adapter.split_batch(dict(batch), preset.task)
                inputs = tuple(t.clone() for t in inputs)     # new mask tensors each step: nothing cached
                net.zero_grad(set_to_none=True)
                sync(device)
                t0 = time.perf_counter()
                step(seq, inputs, labels)
                sync(device)
                if i >= 6:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        mod.layer_padding_mask = ours
        a, c = (statistics.median(times[k]) for k in ("hf_per_layer", "once_per_micro_batch"))
        row = {"model": model, "batch": b, "padded": not bool(batch["attention_mask"].all()),
               "hf_per_layer_ms": a, "once_per_micro_batch_ms": c, "speedup": a / c, "steps": steps,
               "hf_per_layer_all": times["hf_per_layer"], "once_all": times["once_per_micro_batch"]}
        print(f"{model:10s} b={b:<3d} padded={row['padded']!s:5s}  per layer {a:8.2f} ms  once {c:8.2f} ms  "
              f"x{a / c:.3f}", flush=True)
        rows.append(row)
    del net, seq
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["bert-large:8,32", "t5-large:8,16"],
                    help="model:batch,batch ... (presets of the bert and t5 families)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--pad", action="store_true", help="pad BERT's batches too")
    ap.add_argument("--device", default="cuda",
                    help="cuda (what it is for) or cpu (a smoke run: no GPU, nothing to measure)")
    ap.add_argument("--out", required=True, help="JSON lines to write")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_mask_sync: error: needs a GPU (the host synchronisation it measures is CUDA's); "
              "run it on a GPU machine", file=sys.stderr)
        return 2
    rows = []
    for item in args.models:
        model, _, bs = item.partition(":")
        if model not in PRESETS or PRESETS[model].family not in ("bert", "t5"):   # the families whose layers mask
            print(f"bench_mask_sync: error: {model!r} is no bert or t5 preset; give e.g. bert-large:8,32",
                  file=sys.stderr)
            return 2
        rows += bench(model, [int(x) for x in (bs or "8").split(",")], args.steps, args.pad, device)
    write_jsonl_atomic(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
