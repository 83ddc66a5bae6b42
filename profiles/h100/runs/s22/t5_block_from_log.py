"""T5-L's engine block from session 22's first call, read back from its log (a/engine_log.txt): that call's 140 s
limit stopped profile_engine after the ZeRO-1 in-step timings, before it wrote the block. Stages 0-2 (micro-batch 1)
and the ZeRO-0/1 in-step timings are the log's numbers (2 decimals); ZeRO-3 stays the profile's earlier stage,
scaled by host speed (autotune.profile_engine.keep_unmeasured_stages). The later calls' T5-L runs on a slower host
were cut too (b/, c/engine_log.txt).

    python profiles/h100/runs/s22/t5_block_from_log.py     (from the repository's root; rewrites the T5-L block)
"""
import os
import re
import sys

sys.path.insert(0, os.getcwd())
from autotune.model_profile import ModelProfile  # noqa: E402
from autotune.profile_engine import keep_unmeasured_stages  # noqa: E402

LOG, PROFILE = "profiles/h100/runs/s22/a/engine_log.txt", "profiles/h100/t5-large.json"
NUM = r"([0-9.]+)"
lines = [ln for ln in open(LOG) if ln.startswith("[profile_engine t5-large]")]
old = ModelProfile.load(PROFILE).engine
block = {k: old[k] for k in ("micro_batch", "checkpoint_layers", "param_tensors", "tensors_total", "device")}
block["stages"] = {}
for ln in lines:
    if m := re.search(rf"bare forward\+backward: {NUM} ms", ln):
        block["bare_microbatch_ms"] = float(m[1])
    elif m := re.search(rf"ZeRO-(\d): micro-batch {NUM} ms \(engine \+{NUM}\), step \+{NUM} ms, optimizer-step "
                        rf"transient {NUM} B/param, states {NUM} MB", ln):
        mb, over, step = float(m[2]), float(m[3]), float(m[4])
        block["stages"][m[1]] = {"microbatch_ms": mb, "boundary_ms": mb + step, "overhead_microbatch_ms": over,
                                 "step_ms": step, "step_transient_bytes_per_param": float(m[5]),
                                 "states_mb": float(m[6])}
    elif m := re.search(rf"ZeRO-(\d) (eager|graphed) in a step of (\d+) x (\d+): {NUM} ms, last backward done at "
                        rf"{NUM}, tail {NUM}", ln):
        block["stages"][m[1]].setdefault("in_step", {})[m[2]] = {
            "micro_batch": int(m[4]), "chunks": int(m[3]), "step_ms": float(m[5]),
            "device_backward_ms": float(m[6]), "tail_ms": float(m[7])}
keep_unmeasured_stages(block, old)
block.update(date="2026-12-07", source=f"{LOG} (read back by profiles/h100/runs/s22/t5_block_from_log.py)")
ModelProfile.set_block(PROFILE, "engine", block)
print({z: sorted(st) for z, st in block["stages"].items()})
