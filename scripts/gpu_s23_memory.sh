#!/usr/bin/env bash
# Session 23 on one H100, first call:
#   1. the no-OOM check not run before: Swin-B's one-GPU plans at 20, 40 and 80 GB and T5-L's at 40 and 80 GB
#      (scripts/no_oom_check.py) -> OUT/no_oom.jsonl, OUT/no_oom_log.txt
#   2. where graphed runs' peaks go, each plan in a fresh process (scripts/memory_peak_trace.py), for the
#      plans under profiles/h100/runs/s23/plans: session 21's graphed sweep rows whose peaks the model missed
#      most (ZeRO-1/2 over by 8-19 %, ZeRO-2 under by 12 %) -> OUT/trace/<plan>/peak.{json,txt}
# Usage: bash scripts/gpu_s23_memory.sh OUT
set -u
out=$(mkdir -p "${1:?usage: gpu_s23_memory.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29581 PYTHONUNBUFFERED=1
boot="boot $(head -c 8 /proc/sys/kernel/random/boot_id); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
echo "$boot" > "$out/no_oom_log.txt"
for spec in swin-base:20,40,80 t5-large:40,80; do
  timeout 200 python scripts/no_oom_check.py --models "${spec%%:*}" --budgets "${spec#*:}" --profiles profiles/h100 \
    --steps 3 --out "$out/no_oom.jsonl" >> "$out/no_oom_log.txt" 2>&1
done
grep "\[no-oom\]" "$out/no_oom_log.txt"
for plan in profiles/h100/runs/s23/plans/*.json; do
  name=$(basename "$plan" .json); model=${name%%_*}
  timeout 60 python scripts/memory_peak_trace.py --model "$model" --galvatron-plan "$plan" --steps 3 \
    --model-profile "profiles/h100/$model.json" --out "$out/trace/$name" > "$out/trace_$name.log" 2>&1
  echo "== $name rc=$?"; head -4 "$out/trace/$name/peak.txt" 2>/dev/null || tail -3 "$out/trace_$name.log"
done
