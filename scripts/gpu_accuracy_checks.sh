#!/usr/bin/env bash
# Session-7 accuracy checks on one GPU, each part writing under OUT_DIR:
#   zero2   fp32 ZeRO-2 with gradient accumulation (and controls), configurations predicted before they
#           are measured: profiles/h100/runs/s7/fp32_zero2_configs.json / fp32_zero2_predicted.txt
#   host    the same train.py configuration in REPEATS fresh processes with host launch/Python probes
#           (scripts/host_speed_repeat.py): does host speed explain the spread of step times?
#   profile the layer-time profile of BERT-large's layer (tp 1) measured three times, --reps 10, 10 and 40:
#           how repeatable the per-batch-size times are, and whether more repetitions narrow them
# Usage: [PARTS="zero2 host profile"] [REPEATS=6] bash scripts/gpu_accuracy_checks.sh OUT_DIR
set -u
out=${1:?usage: gpu_accuracy_checks.sh OUT_DIR}
parts=${PARTS:-zero2 host profile}
mkdir -p "$out"
export MASTER_ADDR=127.0.0.1
for part in $parts; do
  t0=$(date +%s)
  case $part in
    zero2)
      MASTER_PORT=29551 python scripts/sweep_single_gpu.py --models vit-large,t5-large,bert-large,swin-base \
          --configs profiles/h100/runs/s7/fp32_zero2_configs.json --steps 5 --out "$out/fp32_zero2.jsonl" \
          > "$out/zero2_log.txt" 2>&1 || echo "[checks] zero2 failed: $(tail -1 "$out/zero2_log.txt")"
      grep '^\[sweep\]' "$out/zero2_log.txt" ;;
    host)
      MASTER_PORT=29552 python scripts/host_speed_repeat.py --model swin-base --bsz 32 --zero 0 \
          --repeats "${REPEATS:-6}" --out "$out/host_speed.jsonl" > "$out/host_log.txt" 2>&1 \
        || echo "[checks] host failed: $(tail -1 "$out/host_log.txt")"
      grep '^\[host-speed\]' "$out/host_log.txt" ;;
    profile)
      for tag in r10a:10 r10b:10 r40:40; do
        python autotune/profile_model.py --model bert-large --layer-types bert_enc --tp 1 --skip-other \
            --reps "${tag#*:}" --out "$out/bert-large_${tag%%:*}.json" > "$out/profile_${tag%%:*}.txt" 2>&1 \
          || echo "[checks] profile ${tag%%:*} failed: $(tail -1 "$out/profile_${tag%%:*}.txt")"
      done ;;
    *) echo "[checks] unknown part $part (zero2, host, profile)"; exit 2 ;;
  esac
  echo "[checks] $part: $(( $(date +%s) - t0 )) s"
done
