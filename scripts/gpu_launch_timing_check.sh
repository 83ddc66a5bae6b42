#!/usr/bin/env bash
# Session-8 check of the layer profiler's CPU launch timing on one GPU, A/B on one host: the profiler as
# shipped until session 7 (automatic GC on, CPU time per call of a 3-4 call region) against the current one
# (automatic GC off as in train.py, regions of ~25 ms). The first call (b29eeb3) also timed a region of one
# call per repetition (cpu_single_ms) and stored the marginal CPU time; launch_timing_summary.py reads both.
#   OLD_PROFILER  the earlier profiler (e.g. `git show cb71347:autotune/profile_model.py > .whl/old_profile_model.py`;
#                 it must sit one folder below the repository root, which it puts on sys.path); unset: new only
#   MODELS        model:layer-types list (default below); REPS (default 10); DEVICE, PRECISION (cuda, bf16);
#   PROFILE_ARGS  further profiler flags (default --tp 1 --skip-other: layers at TP 1 only)
# Every profile lands in OUT_DIR as <model>_<old|new><n>.json; `python -m autotune.model_profile FILES`
# gives their fit errors, GPU part and CPU launch scatter.
# Usage: [OLD_PROFILER=.whl/old_profile_model.py] bash scripts/gpu_launch_timing_check.sh OUT_DIR
set -u
out=${1:?usage: gpu_launch_timing_check.sh OUT_DIR}
mkdir -p "$out"
reps=${REPS:-10}
models=${MODELS:-"bert-large:bert_enc bert-large:bert_enc vit-large:vit_enc t5-large:t5_enc,t5_dec swin-base:swin_s0,swin_s1_sw_merge,swin_s2,swin_s3"}
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > "$out/gpu.txt" 2>&1
declare -A seen
for item in $models; do
  model=${item%%:*}
  types=${item#*:}
  n=$(( ${seen[$model]:-0} + 1 ))
  seen[$model]=$n
  for variant in new old; do
    if [ "$variant" = old ]; then
      [ -n "${OLD_PROFILER:-}" ] || continue
      prof=$OLD_PROFILER
    else
      prof=autotune/profile_model.py
    fi
    t0=$(date +%s)
    python "$prof" --model "$model" ${types:+--layer-types "$types"} ${PROFILE_ARGS:---tp 1 --skip-other} --reps "$reps" \
        --device "${DEVICE:-cuda}" --precision "${PRECISION:-bf16}" --out "$out/${model}_${variant}${n}.json" \
        > "$out/${model}_${variant}${n}.log" 2>&1 \
      || echo "[launch-check] $model $variant failed: $(tail -1 "$out/${model}_${variant}${n}.log")"
    echo "[launch-check] $model $variant$n: $(( $(date +%s) - t0 )) s"
  done
done
python scripts/launch_timing_summary.py "$out"/*.json
