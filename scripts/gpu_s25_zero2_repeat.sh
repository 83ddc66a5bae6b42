#!/usr/bin/env bash
# Session 25's second device call (one H100): is a graphed ZeRO-2 step's time a property of its configuration?
#   The same graphed ZeRO-2 configurations took very different times on different machines and in different
#   processes (Swin-B batch 64: 99.5 ms on vm/a4fe6c97, 69.6 ms on vm/b8cf16ef; ViT-L batch 32: 100.2 ms, and
#   64 ms at batch 64 in the same process; T5-L batch 8: 102.9 / 109.7 / 128.9 ms on three machines) while their
#   ZeRO-0/1 runs agreed to 1 %. Each configuration of profiles/h100/runs/s25/zero2_repeat_configs.json runs in a
#   fresh process, three rounds over the call, -> OUT/repeat.jsonl, OUT/repeat_log.txt; scripts/sweep_report.py
#   shows each configuration's median and how far one process lies from it.
# Usage: bash scripts/gpu_s25_zero2_repeat.sh OUT
set -u
out=$(mkdir -p "${1:?usage: gpu_s25_zero2_repeat.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29594 PYTHONUNBUFFERED=1
echo "boot $(head -c 8 /proc/sys/kernel/random/boot_id); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)" \
  >> "$out/repeat_log.txt"
for mt in vit-large:130 swin-base:120 t5-large:200; do
  timeout "${mt#*:}" python scripts/sweep_single_gpu.py --models "${mt%%:*}" \
    --configs profiles/h100/runs/s25/zero2_repeat_configs.json --precisions bf16 --train-args=--cuda-graphs \
    --steps 7 --process-per-config --rounds 3 --out "$out/repeat.jsonl" >> "$out/repeat_log.txt" 2>&1
done
grep "\[sweep\]" "$out/repeat_log.txt" | grep -v "process "
