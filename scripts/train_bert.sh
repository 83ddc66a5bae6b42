#!/usr/bin/env bash
# BERT on one GPU (or the CPU) with one strategy (Galvatron's models/bert/scripts/train_bert.sh).
# Usage: [MODEL=bert-base] [TASK=mlm] [GLOBAL_BSZ=8] [STEPS=20] [LR=1e-4] [CHUNKS=1] [CKPT=0] [PRECISION=bf16] \
#        [METRICS=runs/bert.jsonl] scripts/train_bert.sh [extra train.py flags, e.g. --seq-len 128]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-bert-base}
TASK=${TASK:-mlm}
exec python train.py --model "$MODEL" --task "$TASK" --global-batch-size "${GLOBAL_BSZ:-8}" --steps "${STEPS:-20}" \
    --lr "${LR:-1e-4}" --chunks "${CHUNKS:-1}" --checkpoint "${CKPT:-0}" ${PRECISION:+--precision "$PRECISION"} \
    ${METRICS:+--metrics-file "$METRICS"} "$@"
