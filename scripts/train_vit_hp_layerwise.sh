#!/usr/bin/env bash
# ViT on the 8 GPUs of one node under a searched layer-wise hybrid-parallel plan
# (Galvatron's models/vit/scripts/train_vit_hp_layerwise.sh). Make the plan first, e.g.
#   python autotune/search.py --model vit-large --gpus 8 --gpu-memory-gb 40 --out configs/vit-large_8gpus.json
# Usage: [MODEL=vit-large] [PLAN=configs/vit-large_8gpus.json] [NUM_GPUS=8] [STEPS=20] [LR=1e-4] \
#        [METRICS=runs/vit-large_8gpus.jsonl] scripts/train_bert_hp_layerwise.sh [extra train.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-vit-large}
PLAN=${PLAN:-configs/${MODEL}_8gpus.json}
exec deepspeed --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}" train.py --model "$MODEL" \
    --task "${TASK:-image-classification}" --galvatron-plan "$PLAN" --steps "${STEPS:-20}" --lr "${LR:-1e-4}" \
    ${METRICS:+--metrics-file "$METRICS"} "$@"
