#!/usr/bin/env bash
# Shared body of scripts/profile_<family>.sh: one model profile JSON per model in MODELS.
# Variables: MODELS (set by the wrapper), OUT_DIR, DEVICE, PRECISION, BATCH_SIZES, TP.
set -uo pipefail
cd "$(dirname "$0")/../.."
MODELS=${MODELS:?the family wrapper sets MODELS}
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
