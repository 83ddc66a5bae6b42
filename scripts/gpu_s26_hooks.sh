#!/usr/bin/env bash
# Session 26's device call (one H100): how long ZeRO-1/2's hooks keep the host in a graphed step. The engine
# block times them eager; Swin-B's graphed ZeRO-1 steps queued their backward ~21 ms a micro-batch later than its
# ZeRO-0 ones where the block has 10.2. Per model of MODELS: profile_engine.py --only launch-bound (stages 0-2,
# eager and graphed, at the block's micro-batch) into a copy of its profile, OUT/<model>.json; after the first
# model, that model's configurations of CONFIGS, each in a fresh process (its first three: the report's calibration
# configurations, so this machine calibrates its own rows) -> OUT/sweep.jsonl.
# Usage: MODELS="swin-base vit-large bert-large t5-large" CONFIGS=FILE bash scripts/gpu_s26_hooks.sh OUT
set -u
out=$(mkdir -p "${1:?usage: MODELS=... [CONFIGS=FILE] gpu_s26_hooks.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29596 PYTHONUNBUFFERED=1
echo "boot $(head -c 8 /proc/sys/kernel/random/boot_id); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)" \
  | tee -a "$out/log.txt"
first=1
for m in ${MODELS:?give MODELS=\"model ...\"}; do
  cp "profiles/h100/$m.json" "$out/$m.json"
  timeout "${ENGINE_SECS:-110}" python autotune/profile_engine.py --model "$m" --model-profile "$out/$m.json" \
    --only launch-bound --zero 0,1,2 >> "$out/log.txt" 2>&1
  if [ "$first" = 1 ] && [ -n "${CONFIGS:-}" ]; then
    timeout "${SWEEP_SECS:-220}" python scripts/sweep_single_gpu.py --models "$m" --configs "$CONFIGS" \
      --precisions bf16 --train-args=--cuda-graphs --steps 7 --process-per-config --out "$out/sweep.jsonl" \
      >> "$out/log.txt" 2>&1
  fi
  first=0
done
grep -E "\[profile_engine|\[sweep\]" "$out/log.txt" | grep -v "process "
