#!/usr/bin/env bash
# Session 24's second device call (one H100): the graphed sweep of what changed, on one machine
#   profiles/h100/runs/s24/sweep_configs.json: per model the three calibration configurations (each in a fresh
#   process: scripts/sweep_report.py calibrates a machine on its own runs of them), then in one shared process
#   the session-21 sweep's ZeRO-2 configurations and session 23's held-out ZeRO-2 one, and for Swin-B and T5-L
#   session 23's held-out configurations that did not run then -> OUT/sweep.jsonl, OUT/sweep_log.txt
#   (Session 24 ran it for ViT-L only, after gpu_s24.sh in the same call, when the runtime still set ZeRO-2 over
#   one rank without overlap_comm: its three calibration runs stand, the shared process of ZeRO-2 runs was cut
#   by the time limit before it wrote any.)
# Usage: [MODELS="vit-large:135 ..."] bash scripts/gpu_s24_sweep.sh OUT   (model:seconds, default all four)
set -u
out=$(mkdir -p "${1:?usage: gpu_s24_sweep.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29593 PYTHONUNBUFFERED=1
echo "boot $(head -c 8 /proc/sys/kernel/random/boot_id); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)" \
  >> "$out/sweep_log.txt"
for mt in ${MODELS:-vit-large:135 t5-large:175 swin-base:140 bert-large:110}; do
  timeout "${mt#*:}" python scripts/sweep_single_gpu.py --models "${mt%%:*}" \
    --configs profiles/h100/runs/s24/sweep_configs.json --precisions bf16 --train-args=--cuda-graphs --steps 7 \
    --out "$out/sweep.jsonl" >> "$out/sweep_log.txt" 2>&1
done
grep "\[sweep\]" "$out/sweep_log.txt" | grep -v "process "
