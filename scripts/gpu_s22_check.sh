#!/usr/bin/env bash
# Session 22 on one H100, second call (the first: scripts/gpu_in_step_profile.sh, whose blocks went into
# profiles/h100 for BERT-L, ViT-L and Swin-B):
#   1. T5-L's engine block again with room for its ZeRO-2 in-step timings and ZeRO-3 (the first call's limit cut
#      them), into profiles/h100/t5-large.json here
#   2. the bare GPU times (the first call's spun ones did not hold) of the other three, into their profiles
#      -> OUT/profiles.tgz, OUT/engine_log.txt
#   3. the no-OOM check with those profiles: the search's one-GPU plan for each model at 20, 40 and 80 GB,
#      trained under an allocator capped at that budget (scripts/no_oom_check.py; at most NOOM_SECONDS)
#      -> OUT/no_oom.jsonl, OUT/no_oom_log.txt
# Usage: [NOOM_SECONDS=260] bash scripts/gpu_s22_check.sh OUT
set -u
out=$(mkdir -p "${1:?usage: gpu_s22_check.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29581 PYTHONUNBUFFERED=1
log="$out/engine_log.txt"
boot="boot $(head -c 8 /proc/sys/kernel/random/boot_id); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
echo "$boot" > "$log"
keep='profile_engine|rror|Traceback'
timeout 200 python autotune/profile_engine.py --model t5-large --model-profile profiles/h100/t5-large.json \
  --zero 0,1,2,3 --stage-seconds 6 --reps 6 --warmup 2 2>&1 | grep -E "$keep" | tee -a "$log"
for m in bert-large vit-large swin-base; do
  timeout 60 python autotune/profile_engine.py --model "$m" --model-profile "profiles/h100/$m.json" --bare-gpu-only \
    2>&1 | grep -E "$keep" | tee -a "$log"
done
tar -czf "$out/profiles.tgz" profiles/h100/bert-large.json profiles/h100/vit-large.json \
  profiles/h100/swin-base.json profiles/h100/t5-large.json
echo "$boot" > "$out/no_oom_log.txt"
setsid python scripts/no_oom_check.py --budgets 20,40,80 --profiles profiles/h100 --steps 4 \
  --out "$out/no_oom.jsonl" >> "$out/no_oom_log.txt" 2>&1 & job=$!
(sleep "${NOOM_SECONDS:-260}"; kill -TERM -- "-$job" 2>/dev/null) & timer=$!
wait "$job"; kill "$timer" 2>/dev/null
grep -vE "WARN|INFO|warn" "$out/no_oom_log.txt" | tail -20
