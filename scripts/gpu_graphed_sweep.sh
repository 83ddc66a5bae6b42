#!/usr/bin/env bash
# One model's built-in bf16 sweep under --cuda-graphs on one GPU machine (session 20), each configuration in a
# fresh process unless SHARED=1; scripts/sweep_single_gpu.py runs ZeRO-3 eager (train.py does not graph it).
# Under OUT_DIR:
#   MODEL.jsonl     the sweep records (the first 3 configurations are the ones sweep_report.py calibrates on)
#   MODEL_log.txt   the machine's boot id and GPU, then the sweep's own lines and any error lines
#   gpu_MODEL.csv   nvidia-smi every second
# Three files a model: a device call returns at most 8 (session 20 lost ViT-L's two of ten).
# Score: python scripts/sweep_report.py --sweep OUT_DIR/MODEL.jsonl ... --profiles profiles/h200 --hardware 1xH200
# SHARED=1: the ZeRO 0-2 configurations after the calibration ones share one process (~13 s less each: a fresh
# process spends that importing and starting before run_one; session 20's Swin-B sweep took 560 s in fresh ones).
# REPEATS=R: each calibration configuration in R fresh processes, the report takes their median (one run carries
# its process's host speed: Swin-B's batch-16 ZeRO-0 optimizer step took 50.7 ms there, 31-45 ms in the others).
# Usage: [STEPS=9] [SKIP=0] [SHARED=1] [REPEATS=1] bash scripts/gpu_graphed_sweep.sh MODEL OUT_DIR
set -u
model=${1:?usage: gpu_graphed_sweep.sh MODEL OUT_DIR}
out=$(mkdir -p "${2:?usage: gpu_graphed_sweep.sh MODEL OUT_DIR}" && cd "$2" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29561 PYTHONUNBUFFERED=1
log="$out/${model}_log.txt"
{ echo "boot $(head -c 8 /proc/sys/kernel/random/boot_id)"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader 2>&1; } > "$log"
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,utilization.gpu,memory.used \
  --format=csv,noheader -l 1 > "$out/gpu_$model.csv" 2>&1 & smi=$!
trap 'kill $smi 2>/dev/null' EXIT
python scripts/sweep_single_gpu.py --models "$model" --precisions bf16 --steps "${STEPS:-9}" --skip "${SKIP:-0}" \
  --calibration-repeats "${REPEATS:-1}" $([ "${SHARED:-0}" = 1 ] || echo --process-per-config) \
  --train-args=--cuda-graphs --out "$out/$model.jsonl" 2>&1 \
  | grep --line-buffered -E '^\[sweep\]|Error|error' | sed -u -e "s#${PYTHONPATH:-/nonexistent}#<wheels>#g" >> "$log"
