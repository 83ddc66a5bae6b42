#!/usr/bin/env bash
# Model profiles of the vit presets on one GPU (Galvatron's models/vit/scripts/profile_*.sh): per layer type
# forward / backward / recompute time against micro-batch size for each TP shard shape, activation bytes,
# and the embeddings and head; one JSON per model.
# Usage: [MODELS="vit-base vit-large"] [OUT_DIR=profiles/h100] [DEVICE=cuda] [PRECISION=bf16] \
#        scripts/profile_vit.sh [extra autotune/profile_model.py flags, e.g. --seq-len ...]
export MODELS=${MODELS:-vit-base vit-large}
exec "$(dirname "$0")/lib/profile_models.sh" "$@"
