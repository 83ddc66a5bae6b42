#!/usr/bin/env bash
# One GPU call: the one-GPU hardware profile and the bf16 model profiles of the eight shipped models, made
# with the profiler as it is now (embeddings and head timed like the layers, SpunStep), then the fit summary.
#   TAG      file-name tag of the hardware profile (default: H200 -> hardware-1xH200.json)
#   MODELS   comma-separated presets, profiled in this order (default: the four sweep models first)
#   BUDGET   --time-budget of the model profiler in seconds (default 430): models not started by then are skipped
# Writes OUT_DIR/reprofile.tgz (folder reprofile/: profiles, logs, summary.md); commit it under profiles/<gpu>/.
# Usage: bash scripts/gpu_reprofile.sh OUT_DIR
set -u
out=${1:?usage: gpu_reprofile.sh OUT_DIR}
w=/tmp/reprofile; rm -rf "$w"; mkdir -p "$w"
trap 'tar -C /tmp -czf "$out/reprofile.tgz" reprofile' EXIT
models=${MODELS:-bert-large,vit-large,t5-large,swin-base,bert-base,vit-base,t5-base,swin-large}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv > "$w/gpu.txt" 2>&1
lscpu | grep -E "Model name|^CPU\(s\)" >> "$w/gpu.txt" 2>&1
timeout 60 python autotune/profile_hardware.py --out "$w/hardware-1x${TAG:-H200}.json" > "$w/log_hardware.txt" 2>&1
tail -2 "$w/log_hardware.txt"
timeout $(( ${BUDGET:-430} + 130 )) python autotune/profile_model.py --model "$models" --device cuda --precision bf16 \
  --batch-sizes 1,2,4,8,16,32 --tp 1,2,4,8 --time-budget "${BUDGET:-430}" --out "$w" > "$w/log_profile.txt" 2>&1
grep -v "it/s\|s/it" "$w/log_profile.txt" | tail -15
python -m autotune.model_profile $(ls "$w"/*.json | grep -v /hardware-) > "$w/summary.md" 2>&1
head -14 "$w/summary.md"
