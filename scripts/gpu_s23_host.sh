#!/usr/bin/env bash
# Session 23 on one H100, the hooks' host work as graphed steps run it, and the no-OOM check not run before:
#   1. per model, graphed one-micro-batch steps at ZeRO 0, 1 and 2 (autotune/profile_engine.py --only
#      graphed-host) into profiles/h100/<model>.json here; T5-L's in-step ZeRO-2 timings (cut by session 22's
#      limits) with them -> OUT/profiles.tgz, OUT/engine_log.txt
#   2. the no-OOM check: Swin-B's one-GPU plans at 20, 40 and 80 GB, T5-L's at 40 and 80 GB
#      (scripts/no_oom_check.py) -> OUT/no_oom.jsonl, OUT/no_oom_log.txt
# Usage: bash scripts/gpu_s23_host.sh OUT
set -u
out=$(mkdir -p "${1:?usage: gpu_s23_host.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29581 PYTHONUNBUFFERED=1
log="$out/engine_log.txt"
boot="boot $(head -c 8 /proc/sys/kernel/random/boot_id); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
echo "$boot" > "$log"
keep='profile_engine|rror|Traceback|wrote'
for job in bert-large:graphed-host:0,1,2 vit-large:graphed-host:0,1,2 swin-base:graphed-host:0,1,2 \
           t5-large:graphed-host:0,1,2 t5-large:in-step:2; do
  IFS=: read -r m parts zero <<< "$job"
  timeout 150 python autotune/profile_engine.py --model "$m" --model-profile "profiles/h100/$m.json" \
    --only "$parts" --zero "$zero" --reps 6 --warmup 2 2>&1 | grep -E "$keep" | tee -a "$log"
done
tar -czf "$out/profiles.tgz" profiles/h100/bert-large.json profiles/h100/vit-large.json \
  profiles/h100/swin-base.json profiles/h100/t5-large.json
echo "$boot" > "$out/no_oom_log.txt"
for spec in swin-base:20,40,80 t5-large:40,80; do
  timeout 200 python scripts/no_oom_check.py --models "${spec%%:*}" --budgets "${spec#*:}" --profiles profiles/h100 \
    --steps 3 --out "$out/no_oom.jsonl" >> "$out/no_oom_log.txt" 2>&1
done
grep "\[no-oom\]" "$out/no_oom_log.txt"
