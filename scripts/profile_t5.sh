#!/usr/bin/env bash
# Model profiles of the t5 presets on one GPU (Galvatron's models/t5/scripts/profile_*.sh): per layer type
# forward / backward / recompute time against micro-batch size for each TP shard shape, activation bytes,
# and the embeddings and head; one JSON per model.
# Usage: [MODELS="t5-base t5-large"] [OUT_DIR=profiles/h100] [DEVICE=cuda] [PRECISION=bf16] \
#        scripts/profile_t5.sh [extra autotune/profile_model.py flags, e.g. --seq-len ...]
export MODELS=${MODELS:-t5-base t5-large}
exec "$(dirname "$0")/lib/profile_models.sh" "$@"
