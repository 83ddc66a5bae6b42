#!/usr/bin/env bash
# T5 on the 8 GPUs of one node under a searched layer-wise hybrid-parallel plan
# (Galvatron's models/t5/scripts/train_t5_hp_layerwise.sh). Make the plan first, e.g.
#   python autotune/search.py --model t5-large --gpus 8 --gpu-memory-gb 40 --out configs/t5-large_8gpus.json
# Usage: [MODEL=t5-large] [PLAN=configs/t5-large_8gpus.json] [NUM_GPUS=8] [STEPS=20] [LR=1e-4] \
#        [METRICS=runs/t5-large_8gpus.jsonl] scripts/train_t5_hp_layerwise.sh [extra train.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-t5-large}
PLAN=${PLAN:-configs/${MODEL}_8gpus.json}
exec deepspeed --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}" train.py --model "$MODEL" \
    --task "${TASK:-seq2seq}" --galvatron-plan "$PLAN" --steps "${STEPS:-20}" --lr "${LR:-1e-4}" \
    ${METRICS:+--metrics-file "$METRICS"} "$@"
