#!/usr/bin/env bash
# The blocks of a model profile that need train.py's engine, measured on one GPU and written into the profile
# in place: DeepSpeed's per-stage overhead (autotune/profile_engine.py, report DIR/engine_<model>.json) and
# the layers' backward workspace (autotune/profile_workspace.py). The sweep's predictions need both.
#   STAGE_SECONDS  time per ZeRO stage of the engine profile (default 10)
# Usage: bash scripts/gpu_engine_blocks.sh DIR MODEL...      (profiles DIR/<model>.json)
set -u
dir=${1:?usage: gpu_engine_blocks.sh DIR MODEL...}
shift
for m in "$@"; do
  f="$dir/$m.json"
  [ -f "$f" ] || { echo "[blocks] no $f: skipped"; continue; }
  t0=$(date +%s)
  timeout 240 python autotune/profile_engine.py --model "$m" --model-profile "$f" \
    --stage-seconds "${STAGE_SECONDS:-10}" --out "$dir/engine_$m.json" > "$dir/log_engine_$m.txt" 2>&1 \
    || echo "[blocks] engine $m failed: $(tail -1 "$dir/log_engine_$m.txt")"
  grep "^\[profile_engine" "$dir/log_engine_$m.txt"
  timeout 150 python autotune/profile_workspace.py --model "$m" --model-profile "$f" \
    > "$dir/log_workspace_$m.txt" 2>&1 || echo "[blocks] workspace $m failed: $(tail -1 "$dir/log_workspace_$m.txt")"
  grep "^\[profile_workspace" "$dir/log_workspace_$m.txt"
  echo "[blocks] $m: $(( $(date +%s) - t0 )) s"
done
