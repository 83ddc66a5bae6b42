#!/usr/bin/env bash
# GPU call(s) for the engine-overhead profiles (autotune/profile_engine.py) of the one-GPU sweep models.
#   bash scripts/gpu_engine_profile.sh bf16 OUT_DIR   engine block of profiles/h100/<m>.json (copied to OUT/bf16),
#                                                     plus memory-phase diagnostics of fully checkpointed steps
#   bash scripts/gpu_engine_profile.sh fp32 OUT_DIR   fp32 layer profiles (TP 1, what one GPU runs) + their engine
#   bash scripts/gpu_engine_profile.sh fp32-engine OUT_DIR   engine blocks of the fp32 profiles in profiles/h100/fp32
#                                                     (MODELS, default bert-large vit-large), then the recompute
#                                                     diagnostics (RECOMPUTE_MODELS: bf16, ZeRO 0 and 3, all layers
#                                                     checkpointed) that give ZeRO-3's repeated gathers
#   bash scripts/gpu_engine_profile.sh workspace OUT_DIR   layers' backward workspace (autotune/profile_workspace.py)
#                                                     into copies of the bf16 and fp32 profiles (OUT/workspace/...)
# Commit what comes back under profiles/h100/ (bf16) and profiles/h100/fp32/.
set -u
phase=${1:?usage: gpu_engine_profile.sh bf16|fp32|fp32-engine|workspace OUT_DIR}
out=${2:?usage: gpu_engine_profile.sh bf16|fp32|fp32-engine|workspace OUT_DIR}
models=${MODELS:-bert-large vit-large swin-base t5-large}
mkdir -p "$out/$phase"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/gpu_$phase.txt" 2>&1
if [ "$phase" = bf16 ]; then
  for m in $models; do
    cp "profiles/h100/$m.json" "$out/bf16/$m.json"
    timeout 240 python autotune/profile_engine.py --model "$m" --model-profile "$out/bf16/$m.json" \
      --stage-seconds 25 --out "$out/bf16/engine_$m.json" 2>&1 | grep -v "return func\|Warning\|warn(" | tee -a "$out/log_bf16.txt"
  done
  # where the peak of a fully checkpointed step sits (forward/backward or optimizer step), ZeRO-0 and 1
  timeout 90 python autotune/profile_engine.py --model bert-large --model-profile profiles/h100/bert-large.json \
    --zero 0,1 --micro-batch 32 --checkpoint-layers 24 --reps 2 --warmup 1 --no-update \
    --out "$out/bf16/diag_bert-large_b32_ckpt24.json" 2>&1 | grep "profile_engine" | tee -a "$out/log_bf16.txt"
  timeout 90 python autotune/profile_engine.py --model vit-large --model-profile profiles/h100/vit-large.json \
    --zero 0 --micro-batch 64 --checkpoint-layers 24 --reps 2 --warmup 1 --no-update \
    --out "$out/bf16/diag_vit-large_b64_ckpt24.json" 2>&1 | grep "profile_engine" | tee -a "$out/log_bf16.txt"
elif [ "$phase" = fp32 ]; then
  # the ViT-L bf16 engine block again (its file did not come back the first time) and the build-time
  # memory peak per stage (model on the device + DeepSpeed's copies, before the first step)
  cp profiles/h100/vit-large.json "$out/fp32/vit-large-bf16.json"
  timeout 150 python autotune/profile_engine.py --model vit-large --model-profile "$out/fp32/vit-large-bf16.json" \
    --stage-seconds 25 --out "$out/fp32/engine_vit-large-bf16.json" 2>&1 | grep "profile_engine" | tee -a "$out/log_fp32.txt"
  list=$(echo $models | tr ' ' ',')
  timeout 250 python autotune/profile_model.py --model "$list" --device cuda --precision fp32 --batch-sizes 1,2,4,8,16 \
    --tp 1 --time-budget 170 --out "$out/fp32" > "$out/log_fp32_profile.txt" 2>&1
  tail -12 "$out/log_fp32_profile.txt"
  for m in $models; do
    [ -f "$out/fp32/$m.json" ] || continue
    timeout 55 python autotune/profile_engine.py --model "$m" --model-profile "$out/fp32/$m.json" --zero 0,1,2 \
      --stage-seconds 6 --warmup 2 --out "$out/fp32/engine_$m.json" 2>&1 | grep "profile_engine" | tee -a "$out/log_fp32.txt"
  done
elif [ "$phase" = fp32-engine ]; then
  lscpu | grep -E "Model name|^CPU\(s\)|MHz" > "$out/$phase/cpu.txt" 2>&1
  for m in ${MODELS:-bert-large vit-large}; do
    cp "profiles/h100/fp32/$m.json" "$out/$phase/$m.json"
    timeout "${ENGINE_TIMEOUT:-150}" python autotune/profile_engine.py --model "$m" --model-profile "$out/$phase/$m.json" \
      --stage-seconds 10 --warmup 2 --out "$out/$phase/engine_$m.json" 2>&1 | grep "profile_engine" | tee -a "$out/$phase/log.txt"
  done
  for m in ${RECOMPUTE_MODELS-bert-large swin-base}; do   # RECOMPUTE_MODELS= skips them
    n=$(python -c "from model_zoo import get_model_spec; print(get_model_spec('$m').num_layers)" 2>/dev/null)
    timeout "${RECOMPUTE_TIMEOUT:-100}" python autotune/profile_engine.py --model "$m" --model-profile "profiles/h100/$m.json" \
      --zero 0,3 --checkpoint-layers "$n" --stage-seconds 10 --warmup 2 --no-update \
      --out "$out/$phase/recompute_$m.json" 2>&1 | grep "profile_engine" | tee -a "$out/$phase/log.txt"
  done
elif [ "$phase" = workspace ]; then
  mkdir -p "$out/$phase/fp32"
  for m in $models; do
    for src in "profiles/h100/$m.json" "profiles/h100/fp32/$m.json"; do
      dst="$out/$phase/${src#profiles/h100/}"
      cp "$src" "$dst"
      timeout 120 python autotune/profile_workspace.py --model "$m" --model-profile "$dst" 2>&1 \
        | grep "profile_workspace\|error" | tee -a "$out/$phase/log.txt"
    done
  done
fi
# one archive: the device tool returns a limited number of files
tar -C "$out" -czf "$out/results_$phase.tgz" "$phase" && rm -rf "${out:?}/$phase"
