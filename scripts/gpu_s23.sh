#!/usr/bin/env bash
# Session 23's first device call (it ran at commit 622ddec, whose profile_engine.py had an `--only graphed-host` part
# that measured graphed one-micro-batch steps per ZeRO stage; it was removed after this run: see
# profiles/h100/runs/s23/README.md), parts in priority order (the call's limit may cut the last ones; each part writes
# its results as it goes):
#   1. on an H100 only (host timings for profiles/h100): graphed one-micro-batch steps at ZeRO 0-2 per model and
#      T5-L's in-step ZeRO-2 timings (scripts/gpu_s23_host.sh's first part) -> OUT/profiles.tgz, engine_log.txt
#   2. allocator traces of BERT-L's batch-32 ZeRO-0/1/2 and T5-L's batch-16 ZeRO-1 graphed plans (memory, any GPU)
#   3. the no-OOM check: Swin-B at 20/40/80 GB, T5-L at 40/80 GB
#   4. the other traces under profiles/h100/runs/s23/plans
# Usage: bash scripts/gpu_s23.sh OUT
set -u
out=$(mkdir -p "${1:?usage: gpu_s23.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29581 PYTHONUNBUFFERED=1
boot="boot $(head -c 8 /proc/sys/kernel/random/boot_id); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
echo "$boot" | tee "$out/engine_log.txt"
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100; then
  for job in bert-large:graphed-host:0,1,2 vit-large:graphed-host:0,1,2 swin-base:graphed-host:0,1,2 \
             t5-large:graphed-host:0,1,2 t5-large:in-step:2; do
    IFS=: read -r m parts zero <<< "$job"
    timeout 150 python autotune/profile_engine.py --model "$m" --model-profile "profiles/h100/$m.json" \
      --only "$parts" --zero "$zero" --reps 6 --warmup 2 2>&1 | grep -E 'profile_engine|rror|Traceback|wrote' \
      | tee -a "$out/engine_log.txt"
    tar -czf "$out/profiles.tgz" profiles/h100/bert-large.json profiles/h100/vit-large.json \
      profiles/h100/swin-base.json profiles/h100/t5-large.json
  done
fi
trace() {
  local plan=$1 name model
  name=$(basename "$plan" .json); model=${name%%_*}
  [ -e "$out/trace/$name/peak.txt" ] && return
  timeout 90 python scripts/memory_peak_trace.py --model "$model" --galvatron-plan "$plan" --steps 3 \
    --model-profile "profiles/h100/$model.json" --out "$out/trace/$name" > "$out/trace_$name.log" 2>&1
  echo "== $name rc=$?"; head -3 "$out/trace/$name/peak.txt" 2>/dev/null || tail -3 "$out/trace_$name.log"
}
plans=profiles/h100/runs/s23/plans
for p in bert-large_b32c1k0z1 bert-large_b32c1k0z0 t5-large_b16c1k0z1 bert-large_b32c1k0z2; do trace "$plans/$p.json"; done
echo "$boot" > "$out/no_oom_log.txt"
for spec in swin-base:20,40,80 t5-large:40,80; do
  timeout 200 python scripts/no_oom_check.py --models "${spec%%:*}" --budgets "${spec#*:}" --profiles profiles/h100 \
    --steps 3 --out "$out/no_oom.jsonl" >> "$out/no_oom_log.txt" 2>&1
  grep "\[no-oom\]" "$out/no_oom_log.txt" | tail -3
done
for p in "$plans"/*.json; do trace "$p"; done
