#!/usr/bin/env bash
# Swin on the 8 GPUs of one node under a searched layer-wise hybrid-parallel plan
# (Galvatron's models/swin/scripts/train_swin_hp_layerwise.sh). Make the plan first, e.g.
#   python autotune/search.py --model swin-large --gpus 8 --gpu-memory-gb 40 --out configs/swin-large_8gpus.json
# Usage: [MODEL=swin-large] [PLAN=configs/swin-large_8gpus.json] [NUM_GPUS=8] [STEPS=20] [LR=1e-4] \
#        [METRICS=runs/swin-large_8gpus.jsonl] scripts/train_swin_hp_layerwise.sh [extra train.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-swin-large}
PLAN=${PLAN:-configs/${MODEL}_8gpus.json}
exec deepspeed --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}" train.py --model "$MODEL" \
    --task "${TASK:-image-classification}" --galvatron-plan "$PLAN" --steps "${STEPS:-20}" --lr "${LR:-1e-4}" \
    ${METRICS:+--metrics-file "$METRICS"} "$@"
