"""One-GPU step time of train.py's engine in several precision/compile modes, next to plain HF.

    python scripts/bench_engine_modes.py --models vit-large,t5-large --modes hf,ds-bf16-z1,ds-amp-z0 \
        --steps 10 --out runs/modes.jsonl [--profile-dir runs/prof]

Modes (all at the anchor batch of shared/reference/anchors.md, one micro-batch, dp = 1):
  hf            plain HF loop: fp32 weights, bf16 autocast, fused torch AdamW, clip 1.0 (the anchor)
  ds-bf16-z<k>  DeepSpeed bf16 engine (bf16 weights + fp32 master copy), ZeRO stage k
  ds-amp-z<k>   DeepSpeed `torch_autocast` engine (fp32 weights, bf16 autocast), ZeRO stage k
  ...-compile   the same with every Transformer layer torch.compile'd
  ...-noclip    DeepSpeed modes without gradient clipping (what clipping costs)
  ...-nohook    DeepSpeed bf16 with immediate_grad_update off (fp32 gradients filled after backward)
Every mode reports the median step time, samples/s, TFLOP/s and its share of the bf16 GEMM
ceiling, peak memory, and a per-phase split (forward / backward / optimizer step, each timed
between two synchronisations in separate steps). With --profile-dir, torch.profiler tables of
one step per mode are written there.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ANCHORS = {"bert-large": 32, "vit-large": 64, "swin-base": 64, "t5-large": 16}
GEMM_CEILING_TFLOPS = 734.5


def setup_model(model_name: str):
    """(adapter, config, task, seq_len, seeded full state dict) of a preset: what every runner starts from."""
    import torch

    from model_zoo.registry import FAMILIES, PRESETS, default_task, load_hf_config
    from model_zoo.runtime import get_adapter

    config = load_hf_config(model_name)
    adapter = get_adapter(FAMILIES[config.model_type])
    task = default_task(config, PRESETS.get(model_name))
    seq = PRESETS[model_name].seq_len if model_name in PRESETS else None
    torch.manual_seed(1234)
    state = adapter.build_model(config, task).state_dict()
    return adapter, config, task, seq, state


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _dev() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HFRunner:
    """The plain loop users write without a planner (what anchors.md measured: bf16 autocast over fp32
    weights; `autocast=False` for a plain fp32 loop)."""

    def __init__(self, adapter, config, task, seq, state, batch, compile_layers: bool, autocast: bool = True):
        import torch

        self.adapter, self.config, self.task, self.seq, self.batch = adapter, config, task, seq, batch
        self.autocast = autocast
        self.model = adapter.build_model(config, task, state).to(_dev())
        if compile_layers:
            for entry in adapter.layer_sequence(self.model, task).layers:
                entry.module.compile()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01, fused=_dev() == "cuda")

    def data(self, step):
        b = self.adapter.synthetic_batch(self.config, self.task, self.batch, 1234, step, seq_len=self.seq)
        return {k: v.to(_dev(), non_blocking=True) for k, v in b.items()}

    def forward(self, data):
        import torch

        with torch.autocast(_dev(), dtype=torch.bfloat16, enabled=self.autocast):
            return self.adapter.hf_loss(self.model, data)

    def backward(self, loss):
        loss.backward()

    def step(self):
        import torch

        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def destroy(self):
        pass


class DSRunner:
    """train.py's engine (Megatron groups + DeepSpeed) for a dp = 1 plan."""

    def __init__(self, adapter, config, task, seq, state, batch, zero: int, amp: bool, compile_layers: bool,
                 overrides: dict | None = None):
        import backends.deepspeed.engine as engine_module
        from autotune.plan import Plan
        from backends.data import SyntheticData
        from backends.deepspeed.engine import _to, build_engine, device
        from backends.megatron.groups import build_parallel_groups, init_distributed

        init_distributed()
        plan = Plan.uniform(num_layers=adapter.num_layers(config), world_size=1, global_bsz=batch, chunks=1,
                            zero_stage=zero, precision="bf16")
        groups = build_parallel_groups(plan)
        model = adapter.build_model(config, task, state)
        adapter.tensor_parallelize(model, task, groups.tp_groups)
        make = engine_module.make_ds_config

        def patched(*a, **k):
            cfg = make(*a, **k)
            for key, value in (overrides or {}).items():
                if isinstance(value, dict):
                    cfg.setdefault(key, {}).update(value)
                else:
                    cfg[key] = value
            return cfg

        engine_module.make_ds_config = patched
        try:
            self.trainer = build_engine(plan, groups, adapter.layer_sequence(model, task), autocast=amp,
                                        compile_mode="default" if compile_layers else None)
        finally:
            engine_module.make_ds_config = make
        self.source = SyntheticData(adapter, config, task, plan, 0, 1234, seq_len=seq)
        self._to, self._device = _to, device
        import torch

        self.dtype = torch.float32 if self.trainer.autocast else torch.bfloat16

    def data(self, step):
        (inputs, labels), = self.source.micro_batches(step)
        dev = self._device()
        return self._to(inputs, dev, self.dtype), self._to(labels, dev)

    def forward(self, data):
        return self.trainer.engine(*data)

    def backward(self, loss):
        self.trainer.engine.backward(loss)

    def step(self):
        self.trainer.engine.step()

    def destroy(self):
        self.trainer.destroy()


SUFFIXES = {"-compile": {}, "-noclip": {"gradient_clipping": 0.0}, "-nohook": {"bf16": {"immediate_grad_update": False}}}


def make_runner(mode: str, setup, batch: int):
    base, overrides, compile_layers = mode, {}, False
    while any(base.endswith(s) for s in SUFFIXES):
        suffix = next(s for s in SUFFIXES if base.endswith(s))
        base = base.removesuffix(suffix)
        overrides.update(SUFFIXES[suffix])
        compile_layers |= suffix == "-compile"
    if base == "hf":
        return HFRunner(*setup, batch, compile_layers)
    kind, zero = base.rsplit("-z", 1)
    if kind not in ("ds-bf16", "ds-amp"):
        raise SystemExit(f"unknown mode {mode!r}; use hf, ds-bf16-z<k>, ds-amp-z<k> (+ {', '.join(SUFFIXES)})")
    return DSRunner(*setup, batch, int(zero), kind == "ds-amp", compile_layers, overrides)


def timed_steps(runner, steps: int, warmup: int = 0) -> list[float]:
    """Seconds of each whole step (forward, backward, optimizer) after `warmup` untimed ones; the batch
    reaches the device before the timer starts."""
    times = []
    for i in range(warmup + steps):
        data = runner.data(i)
        _sync()
        t0 = time.perf_counter()
        loss = runner.forward(data)
        runner.backward(loss)
        runner.step()
        float(loss)
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def measure(runner, steps: int, warmup: int, profile_path: str | None) -> dict:
    import torch

    step_times, phases = timed_steps(runner, steps, warmup), {"forward": [], "backward": [], "step": []}
    for i in range(3):                                  # phase split: synchronise between phases
        data = runner.data(i)
        _sync()
        t0 = time.perf_counter()
        loss = runner.forward(data)
        _sync()
        t1 = time.perf_counter()
        runner.backward(loss)
        _sync()
        t2 = time.perf_counter()
        runner.step()
        _sync()
        t3 = time.perf_counter()
        phases["forward"].append(t1 - t0)
        phases["backward"].append(t2 - t1)
        phases["step"].append(t3 - t2)
    if profile_path:
        from torch.profiler import ProfilerActivity, profile

        data = runner.data(0)
        _sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            loss = runner.forward(data)
            runner.backward(loss)
            runner.step()
            _sync()
        with open(profile_path, "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
            f.write("\n\n")
            f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
    return {"step_time_s": statistics.median(step_times),
            "phases_s": {k: statistics.median(v) for k, v in phases.items()},
            "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0}


def cleanup() -> None:
    import torch
    import torch._dynamo

    try:
        from megatron.core import parallel_state
        parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001
        pass
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bert-large,vit-large,swin-base,t5-large")
    ap.add_argument("--modes", default="hf,ds-bf16-z1,ds-amp-z0,ds-bf16-z1-compile")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", required=True, help="JSON lines, one per (model, mode)")
    ap.add_argument("--profile-dir", default=None)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("warning: no CUDA GPU; running on CPU (for checking the script, not for numbers)", file=sys.stderr)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29547")
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
    for model in args.models.split(","):
        batch = ANCHORS.get(model, 16)
        setup = setup_model(model)
        flops = setup[0].flops_per_sample(setup[1], setup[2], seq_len=setup[3]) * batch
        for mode in args.modes.split(","):
            t0 = time.time()
            rec = {"model": model, "mode": mode, "batch": batch}
            try:
                runner = make_runner(mode, setup, batch)
                prof = os.path.join(args.profile_dir, f"{model}-{mode}.txt") if args.profile_dir else None
                warmup = args.warmup + (3 if "-compile" in mode else 0)
                rec.update(measure(runner, args.steps, warmup, prof))
                runner.destroy()
                del runner
                rec["samples_per_s"] = batch / rec["step_time_s"]
                rec["tflops"] = flops / rec["step_time_s"] / 1e12
                rec["ceiling_share"] = rec["tflops"] / GEMM_CEILING_TFLOPS
            except Exception as e:  # noqa: BLE001 - a benchmark records the failure and goes on
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                cleanup()
            rec["wall_s"] = time.time() - t0
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if "error" in rec:
                print(f"[modes] {model:11s} {mode:22s} ERROR {rec['error']}", flush=True)
            else:
                ph = rec["phases_s"]
                print(f"[modes] {model:11s} {mode:22s} {rec['step_time_s'] * 1e3:7.1f} ms  "
                      f"{rec['samples_per_s']:7.1f} samples/s  {rec['tflops']:6.1f} TFLOP/s "
                      f"({100 * rec['ceiling_share']:.1f} %)  peak {rec['peak_memory_mb']:.0f} MB  "
                      f"fwd/bwd/step {ph['forward'] * 1e3:.1f}/{ph['backward'] * 1e3:.1f}/{ph['step'] * 1e3:.1f} ms"
                      f"  ({rec['wall_s']:.0f} s)", flush=True)
        del setup
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
