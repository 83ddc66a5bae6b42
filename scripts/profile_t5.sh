#!/usr/bin/env bash
# Model profiles of the t5 presets on one GPU (Galvatron's models/t5/scripts/profile_*.sh): per layer type
# forward / backward / recompute time against micro-batch size for each TP shard shape, activation bytes,
# and the embeddings and head; one JSON per model.
# Usage: [MODELS="t5-base t5-large"] [OUT_DIR=profiles/h100] [DEVICE=cuda] [PRECISION=bf16] \
#        scripts/profile_t5.sh [extra autotune/profile_model.py flags, e.g. --seq-len ...]
set -uo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-t5-base t5-large}
OUT_DIR=${OUT_DIR:-profiles/h100}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
BATCH_SIZES=${BATCH_SIZES:-1,2,4,8,16,32}
TP=${TP:-1,2,4,8}
mkdir -p "$OUT_DIR"
failed=0
for model in $MODELS; do
  python autotune/profile_model.py --model "$model" --device "$DEVICE" --precision "$PRECISION" \
      --batch-sizes "$BATCH_SIZES" --tp "$TP" --out "$OUT_DIR/$model.json" "$@" || { echo "FAILED: $model"; failed=1; }
done
exit $failed
