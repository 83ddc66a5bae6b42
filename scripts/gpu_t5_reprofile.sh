#!/usr/bin/env bash
# One GPU call: T5 layers' activations re-measured with padded-source inputs (model_zoo/t5/spec.py
# layer_inputs: per-layer bool padding masks, SDPA masks with a batch dimension, as train.py runs them),
# merged into the shipped H100 profiles (times, engine blocks and calibrations kept), then the backward
# workspace of T5-large re-measured on the merged profiles, and train.py's sequence probed against them.
# Usage: bash scripts/gpu_t5_reprofile.sh OUT_DIR   (writes OUT_DIR/t5_reprofile.tgz)
set -u
out=${1:?usage: gpu_t5_reprofile.sh OUT_DIR}
w="$out/t5_reprofile"; mkdir -p "$w/new" "$w/fp32"
export MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29565}
note="T5 layer inputs with padding masks (session 6): activation fields re-measured"
for m in t5-large t5-base; do
  timeout 150 python autotune/profile_model.py --model "$m" --skip-other --out "$w/new/$m.json" > "$w/profile_$m.txt" 2>&1
  python scripts/merge_profile_fields.py --from "$w/new/$m.json" --into "profiles/h100/$m.json" --out "$w/$m.json" \
    --note "$note" | tee -a "$w/merge_log.txt"
done
timeout 150 python autotune/profile_model.py --model t5-large --precision fp32 --skip-other \
  --out "$w/new/fp32_t5-large.json" > "$w/profile_fp32_t5-large.txt" 2>&1
python scripts/merge_profile_fields.py --from "$w/new/fp32_t5-large.json" --into profiles/h100/fp32/t5-large.json \
  --out "$w/fp32/t5-large.json" --note "$note" | tee -a "$w/merge_log.txt"
for p in "$w/t5-large.json" "$w/fp32/t5-large.json"; do
  timeout 120 python autotune/profile_workspace.py --model t5-large --model-profile "$p" 2>&1 \
    | grep "profile_workspace\|error" | tee -a "$w/workspace_log.txt"
done
timeout 120 python scripts/sequence_activation_probe.py --model t5-large --batch 8 --profile "$w/t5-large.json" \
  --out "$w/seq_probe_t5-large.json" 2>&1 | grep -v Warning | head -8 | tee "$w/seq_probe_t5-large.txt"
tar -C "$out" -czf "$out/t5_reprofile.tgz" t5_reprofile
