#!/usr/bin/env bash
# Session 24's first device call (one H100):
#   1. ZeRO-2 reduction options A/B, graphed, every ZeRO-2 configuration of the session-21 sweep
#      (scripts/zero2_overlap_probe.py; overlap = the runtime before session 24, plain = what it sets over one rank
#      now) -> OUT/probe_<model>.jsonl, OUT/probe_log.txt
#   2. the engine block's ZeRO-2 stage re-measured with the runtime's new one-rank config (the other stages kept)
#      -> OUT/engine_<model>.json, OUT/engine_log.txt
# Usage: bash scripts/gpu_s24.sh OUT
set -u
out=$(mkdir -p "${1:?usage: gpu_s24.sh OUT}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1 PYTHONUNBUFFERED=1
boot="boot $(head -c 8 /proc/sys/kernel/random/boot_id); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
echo "$boot" | tee "$out/probe_log.txt" > "$out/engine_log.txt"
probe() {  # model configs variants seconds
  MASTER_PORT=29591 timeout "$4" python scripts/zero2_overlap_probe.py --model "$1" --configs "$2" --variants "$3" \
    --train-args=--cuda-graphs --steps 7 --out "$out/probe_$1.jsonl" >> "$out/probe_log.txt" 2>&1
}
probe vit-large 32:1:0,64:1:0,64:2:0,128:1:12 overlap,plain,noncontig 90
probe swin-base 32:1:0,64:1:0,64:2:0,128:1:12 overlap,plain 70
probe bert-large 16:1:0,32:1:0,32:2:0,64:1:12 overlap,plain 70
probe t5-large 8:1:0,16:1:0,16:2:0,32:1:24 overlap,plain 80
grep "\[probe\]" "$out/probe_log.txt"
for m in vit-large swin-base bert-large t5-large; do
  MASTER_PORT=29592 timeout 65 python autotune/profile_engine.py --model $m --model-profile profiles/h100/$m.json \
    --zero 2 --stage-seconds 8 --reps 6 --warmup 2 --no-update --out "$out/engine_$m.json" >> "$out/engine_log.txt" 2>&1
  echo "engine $m rc=$?" | tee -a "$out/engine_log.txt"
done
