#!/usr/bin/env bash
# Session 21 on one H100 (PROFILES=profiles/h200 on an H200): DeepSpeed's ZeRO-0 optimizer step and ZeRO-2's norm
# and overflow check in multi-tensor ops (backends/deepspeed/fast_step.py, fast_clip.py).
#   1. ENGINE_MODELS' engine blocks: the ENGINE_ZERO stages (default 0,2) re-measured into copies of
#      $PROFILES/<m>.json (the others kept, autotune/profile_engine.keep_unmeasured_stages); for AB_MODEL also
#      DeepSpeed's own ZeRO-0 step and ZeRO-2 checks on the same machine (--no-update) -> OUT/engine.tgz,
#      OUT/engine_log.txt
#   2. SWEEP_MODELS' graphed bf16 sweeps (scripts/gpu_graphed_sweep.sh, SHARED=1), at most SWEEP_SECONDS each
#      -> OUT/<model>.jsonl, <model>_log.txt, gpu_<model>.csv (3 files a model; a device call returns 8)
# Usage: [ENGINE_MODELS=...] [ENGINE_ZERO=0,2] [AB_MODEL=bert-large] [SWEEP_MODELS=bert-large] [SWEEP_SECONDS=380]
#        bash scripts/gpu_fast_step_check.sh OUT
set -u
out=$(mkdir -p "${1:?usage: gpu_fast_step_check.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29571 PYTHONUNBUFFERED=1
log="$out/engine_log.txt"
prof=${PROFILES:-profiles/h100}          # profiles/h200 on an H200
mkdir -p "$out/engine"
{ echo "boot $(head -c 8 /proc/sys/kernel/random/boot_id)"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader 2>&1; } > "$log"
keep='profile_engine|rror'
for m in ${ENGINE_MODELS-bert-large vit-large swin-base t5-large}; do
  cp "$prof/$m.json" "$out/engine/$m.json"
  timeout 120 python autotune/profile_engine.py --model "$m" --model-profile "$out/engine/$m.json" \
    --zero "${ENGINE_ZERO:-0,2}" \
    --stage-seconds 8 --out "$out/engine/engine_$m.json" 2>&1 | grep -E "$keep" | tee -a "$log"
done
ab=${AB_MODEL-bert-large}
if [ -n "$ab" ]; then   # DeepSpeed's own ZeRO-0 step and ZeRO-2 checks, same machine, same command
  echo "DeepSpeed's own step and checks:" | tee -a "$log"
  timeout 120 python - "$ab" "$out/engine/stock_$ab.json" "$prof" <<'PY' 2>&1 | grep -E "$keep" | tee -a "$log"
import sys
import backends.deepspeed.engine  # noqa: F401  (installs the fast paths; undone below)
from backends.deepspeed import fast_clip, fast_step
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
FP16_UnfusedOptimizer.step = fast_step._ORIGINAL_STEP
DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial = fast_clip._ORIGINAL_ZERO_OVERFLOW
DeepSpeedZeroOptimizer.get_grad_norm_direct = fast_clip._ORIGINAL_ZERO_NORM
from autotune import profile_engine
m, dst, prof = sys.argv[1:]
sys.exit(profile_engine.main(["--model", m, "--model-profile", f"{prof}/{m}.json", "--zero", "0,2",
                              "--stage-seconds", "8", "--no-update", "--out", dst]))
PY
fi
tar -C "$out" -czf "$out/engine.tgz" engine && rm -rf "${out:?}/engine"
for m in ${SWEEP_MODELS-bert-large}; do
  SHARED=1 setsid bash scripts/gpu_graphed_sweep.sh "$m" "$out" & sweep=$!     # its own process group:
  (sleep "${SWEEP_SECONDS:-380}"; kill -TERM -- "-$sweep" 2>/dev/null) & timer=$!   # the limit stops all of it
  wait "$sweep"; kill "$timer" 2>/dev/null
done
