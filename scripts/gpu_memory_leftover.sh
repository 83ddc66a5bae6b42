#!/usr/bin/env bash
# What a finished run leaves allocated, then clean one-GPU sweeps (session 13). Under OUT_DIR:
#   leftover_<model>_<config>/leftover.{json,txt}  scripts/memory_leftover_trace.py for each of LEFTOVER
#                  (MODEL:BSZ,CHUNKS,CKPT,ZERO,PREC[:EARLIER;EARLIER] ...: each in a fresh process, after the
#                  EARLIER configurations untraced)
#   sweep.jsonl    SWEEP_MODELS' built-in bf16 sweeps, the calibration configurations in fresh processes
#                  REPEATS times (scripts/sweep_single_gpu.py --calibration-repeats; SWEEP_ARGS added), until
#                  SWEEP_SECONDS run out
#   gpu.csv        nvidia-smi every second
# TAR=FILE: a tar of OUT_DIR written after each part, so a call cut by its time limit still returns the parts done.
# Usage: [LEFTOVER="vit-large:64,1,0,1,bf16"] [SWEEP_MODELS=vit-large] [REPEATS=3] [SWEEP_ARGS=] [SWEEP_SECONDS=400]
#        [TAR=FILE] bash scripts/gpu_memory_leftover.sh OUT_DIR
set -u
out=${1:?usage: gpu_memory_leftover.sh OUT_DIR}
mkdir -p "$out"
export MASTER_ADDR=127.0.0.1
pack() { if [ -n "${TAR:-}" ]; then tar czf "$TAR.tmp" -C "$out" . && mv "$TAR.tmp" "$TAR"; fi; }
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,memory.used \
  --format=csv,noheader -l 1 > "$out/gpu.csv" 2>&1 & smi=$!
trap 'kill $smi 2>/dev/null' EXIT
for spec in ${LEFTOVER-vit-large:64,1,0,1,bf16}; do
  IFS=: read -r model cfg after <<< "$spec"; dir="$out/leftover_${model}_${cfg//,/_}${after:+_after}"
  t0=$(date +%s)
  MASTER_PORT=29554 python scripts/memory_leftover_trace.py --model "$model" --config "$cfg" --after "${after:-}" --out "$dir" \
      > "$dir.log" 2>&1 || echo "[leftover] $spec failed: $(tail -1 "$dir.log")"
  head -1 "$dir/leftover.txt" 2>/dev/null
  echo "[leftover] $spec: $(( $(date +%s) - t0 )) s"
  pack
done
[ -n "${SWEEP_MODELS-vit-large}" ] || exit 0
MASTER_PORT=29555 timeout "${SWEEP_SECONDS:-400}" python scripts/sweep_single_gpu.py \
    --models "${SWEEP_MODELS:-vit-large}" --precisions bf16 --steps 9 --calibration-repeats "${REPEATS:-3}" \
    ${SWEEP_ARGS:-} --out "$out/sweep.jsonl" > "$out/sweep_log.txt" 2>&1 \
  || echo "[sweep] stopped: $(tail -1 "$out/sweep_log.txt")"
grep '^\[sweep\]' "$out/sweep_log.txt" | tail -40
pack
