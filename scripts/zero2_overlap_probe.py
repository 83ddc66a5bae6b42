"""A/B of DeepSpeed's ZeRO-2 gradient-reduction options on one GPU, through train.py (graphed or not).

    python scripts/zero2_overlap_probe.py --model vit-large --configs 32:1:0,64:1:0 --out probe.jsonl \
        [--variants overlap,plain,noncontig] [--train-args=--cuda-graphs] [--steps 7]

Each configuration (bsz:chunks:checkpointed layers, ZeRO-2, bf16) runs once per variant, the variants
interleaved (one process: the A/B is about step time; the peaks of later runs hold earlier runs' leftovers):
  overlap    overlap_comm and contiguous_gradients (the runtime's ZeRO-2: backends/deepspeed/config.py)
  plain      contiguous_gradients alone
  noncontig  neither
One JSON line per run: the sweep's record (scripts/sweep_single_gpu.run_one) and the variant. Why asked: over one
rank there is nothing to overlap, and DeepSpeed 0.19 synchronises the device at backward's end under
overlap_comm; the sweep's graphed ZeRO-2 steps took up to 1.8x their ZeRO-1 twins. Answer (one H100, session
24, profiles/h100/runs/s24/a): keep it. Graphed ViT-L batch 32 took 75.9 / 155.1 / 83.8 ms (overlap / plain /
noncontig), batch 64 86.1 / 111.9 / 88.2 ms; T5-L batch 8 128.9 / 121.5 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {"overlap": (True, True), "plain": (False, True), "noncontig": (False, False)}


def parse_configs(text: str) -> list[dict]:
    out = []
    for item in text.split(","):
        try:
            bsz, chunks, ckpt = (int(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"--configs item {item!r}: give bsz:chunks:ckpt, e.g. 32:1:0") from None
        out.append(dict(bsz=bsz, chunks=chunks, ckpt=ckpt, zero=2, precision="bf16"))
    return out


USED: dict = {}      # the zero_optimization section the engine last built


def force_variant(name: str) -> None:
    """Make the engine build its DeepSpeed config with the variant's reduction options."""
    import backends.deepspeed.engine as engine
    from backends.deepspeed.config import make_ds_config

    overlap, contiguous = VARIANTS[name]

    def patched(plan, **kw):
        cfg = make_ds_config(plan, **kw)
        cfg["zero_optimization"].update(overlap_comm=overlap, contiguous_gradients=contiguous)
        USED.update(cfg["zero_optimization"])
        return cfg
    engine.make_ds_config = patched


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--configs", required=True, help="bsz:chunks:ckpt,... (ZeRO-2, bf16)")
    ap.add_argument("--variants", default="overlap,plain,noncontig")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--train-args", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        cfgs = parse_configs(args.configs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        print(f"error: --variants {args.variants}: use some of {','.join(VARIANTS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    from model_zoo import get_model_spec
    from scripts.sweep_single_gpu import run_one

    n = get_model_spec(args.model).num_layers
    for cfg in cfgs:
        for v in variants:
            force_variant(v)
            rec = run_one(args.model, cfg, args.steps, n, args.train_args.split())
            rec["variant"], rec["zero_optimization"] = v, dict(USED)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            m = rec.get("measured") or {}
            print(f"[probe] {args.model} {cfg['bsz']}:{cfg['chunks']}:{cfg['ckpt']} {v}: "
                  f"{m.get('step_time_s', rec.get('error'))} s, host backward {m.get('host_backward_s')} s, "
                  f"device backward {m.get('device_backward_s')} s, peak {m.get('stage_peak_memory_mb')} MB",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
