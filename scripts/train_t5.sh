#!/usr/bin/env bash
# T5 on one GPU (or the CPU) with one strategy (Galvatron's models/t5/scripts/train_t5.sh).
# Usage: [MODEL=t5-base] [TASK=seq2seq] [GLOBAL_BSZ=8] [STEPS=20] [LR=1e-4] [CHUNKS=1] [CKPT=0] [PRECISION=bf16] \
#        [METRICS=runs/t5.jsonl] scripts/train_t5.sh [extra train.py flags, e.g. --seq-len 256: encoder tokens, the decoder gets a quarter]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-t5-base}
TASK=${TASK:-seq2seq}
exec python train.py --model "$MODEL" --task "$TASK" --global-batch-size "${GLOBAL_BSZ:-8}" --steps "${STEPS:-20}" \
    --lr "${LR:-1e-4}" --chunks "${CHUNKS:-1}" --checkpoint "${CKPT:-0}" ${PRECISION:+--precision "$PRECISION"} \
    ${METRICS:+--metrics-file "$METRICS"} "$@"
