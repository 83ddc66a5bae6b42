#!/usr/bin/env bash
# Swin on one GPU (or the CPU) with one strategy (Galvatron's models/swin/scripts/train_swin.sh).
# Usage: [MODEL=swin-base] [TASK=image-classification] [GLOBAL_BSZ=8] [STEPS=20] [LR=1e-4] [CHUNKS=1] [CKPT=0] [PRECISION=bf16] \
#        [METRICS=runs/swin.jsonl] scripts/train_swin.sh [extra train.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-swin-base}
TASK=${TASK:-image-classification}
exec python train.py --model "$MODEL" --task "$TASK" --global-batch-size "${GLOBAL_BSZ:-8}" --steps "${STEPS:-20}" \
    --lr "${LR:-1e-4}" --chunks "${CHUNKS:-1}" --checkpoint "${CKPT:-0}" ${PRECISION:+--precision "$PRECISION"} \
    ${METRICS:+--metrics-file "$METRICS"} "$@"
