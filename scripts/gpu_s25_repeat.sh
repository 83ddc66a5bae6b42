#!/usr/bin/env bash
# Session 25's device calls 2 and 3 (one H100): is a host-bound graphed step's time a property of its
# configuration? Each configuration of CONFIGS runs in a fresh process, three rounds over the call, ->
# OUT/repeat.jsonl, OUT/repeat_log.txt; scripts/sweep_report.py takes each configuration's median and shows how far
# one process lies from it.
#   call 2: CONFIGS=profiles/h100/runs/s25/zero2_repeat_configs.json MODELS="vit-large:130 swin-base:120 t5-large:200"
#     The same graphed ZeRO-2 configurations had taken very different times on different machines and in
#     different processes (Swin-B batch 64: 99.5 ms on vm/a4fe6c97, 69.6 ms on vm/b8cf16ef; ViT-L batch 32 100.2 ms
#     and batch 64 86.3 ms in one process) while their ZeRO-0/1 runs agreed to 1 %.
#   call 3: CONFIGS=profiles/h100/runs/s25/host_repeat_configs.json MODELS="swin-base:230 vit-large:85 bert-large:85"
#     the other rows the model misses by more than 8 %: Swin-B ZeRO-1 at batch 16-32, checkpointed eager layers,
#     BERT-L ZeRO-2 at batch 24.
# Usage: CONFIGS=FILE MODELS="model:seconds ..." bash scripts/gpu_s25_repeat.sh OUT
set -u
out=$(mkdir -p "${1:?usage: CONFIGS=FILE MODELS=... gpu_s25_repeat.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29594 PYTHONUNBUFFERED=1
echo "boot $(head -c 8 /proc/sys/kernel/random/boot_id); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)" \
  >> "$out/repeat_log.txt"
for mt in ${MODELS:?give MODELS=\"model:seconds ...\"}; do
  timeout "${mt#*:}" python scripts/sweep_single_gpu.py --models "${mt%%:*}" \
    --configs "${CONFIGS:?give CONFIGS=FILE}" --precisions bf16 --train-args=--cuda-graphs \
    --steps 7 --process-per-config --rounds 3 --out "$out/repeat.jsonl" >> "$out/repeat_log.txt" 2>&1
done
grep "\[sweep\]" "$out/repeat_log.txt" | grep -v "process "
