#!/usr/bin/env bash
# Session 23's second device call (one H100 or H200; the memory parts hold on either):
#   1. the no-OOM check of T5-L's 40 and 80 GB one-GPU plans (the first call's limit cut them)
#      -> OUT/no_oom.jsonl, OUT/no_oom_log.txt
#   2. a held-out sweep, graphed, one fresh process per configuration (no earlier run's leftovers in the peak):
#      profiles/h100/runs/s23/validation_configs.json, 4 configurations per model that no sweep ran before
#      (checkpointed prefixes, ZeRO-1 in two micro-batches, ZeRO-2), predicted before they ran
#      (profiles/h100/runs/s23/predicted_before.txt) -> OUT/validation.jsonl, OUT/validation_log.txt
# Usage: bash scripts/gpu_s23_validate.sh OUT
set -u
out=$(mkdir -p "${1:?usage: gpu_s23_validate.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29581 PYTHONUNBUFFERED=1
boot="boot $(head -c 8 /proc/sys/kernel/random/boot_id); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
echo "$boot" | tee "$out/no_oom_log.txt" > "$out/validation_log.txt"
timeout 170 python scripts/no_oom_check.py --models t5-large --budgets 40,80 --profiles profiles/h100 --steps 3 \
  --out "$out/no_oom.jsonl" >> "$out/no_oom_log.txt" 2>&1
grep "\[no-oom\]" "$out/no_oom_log.txt"
timeout "${SWEEP_SECONDS:-360}" python scripts/sweep_single_gpu.py --models bert-large,vit-large,swin-base,t5-large \
  --configs profiles/h100/runs/s23/validation_configs.json --precisions bf16 --process-per-config \
  --train-args=--cuda-graphs --steps 5 --out "$out/validation.jsonl" >> "$out/validation_log.txt" 2>&1
grep -c '"measured"' "$out/validation.jsonl"
