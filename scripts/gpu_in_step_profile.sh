#!/usr/bin/env bash
# Session 22 on one H100: every model's engine block measured again on one machine (stages 0-3 at micro-batch 1,
# the kept ZeRO-1/3 stages of 2026-11-25 among them) with the in-step timings of stages 0-2 (eager and graphed, at
# a GPU-bound micro-batch) and the bare GPU times (autotune/profile_engine.py) -> OUT/engine.tgz (the profiles
# with their new engine blocks, and each block alone), OUT/engine_log.txt.
# Usage: [MODELS="bert-large vit-large swin-base t5-large"] [PROFILES=profiles/h100] [SECONDS_EACH=150]
#        bash scripts/gpu_in_step_profile.sh OUT
set -u
out=$(mkdir -p "${1:?usage: gpu_in_step_profile.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29571 PYTHONUNBUFFERED=1
log="$out/engine_log.txt"
prof=${PROFILES:-profiles/h100}
mkdir -p "$out/engine"
{ echo "boot $(head -c 8 /proc/sys/kernel/random/boot_id)"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader 2>&1; } > "$log"
for m in ${MODELS:-bert-large vit-large swin-base t5-large}; do
  cp "$prof/$m.json" "$out/engine/$m.json"
  t0=$(date +%s)
  timeout "${SECONDS_EACH:-150}" python autotune/profile_engine.py --model "$m" --model-profile "$out/engine/$m.json" \
    --zero 0,1,2,3 --stage-seconds 8 --reps 6 --warmup 2 --out "$out/engine/engine_$m.json" 2>&1 \
    | grep -E "profile_engine|rror|Traceback" | tee -a "$log"
  echo "$m: $(( $(date +%s) - t0 )) s" | tee -a "$log"
  tar -C "$out" -czf "$out/engine.tgz" engine      # after every model: a cut call keeps what was done
done
