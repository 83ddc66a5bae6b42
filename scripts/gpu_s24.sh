#!/usr/bin/env bash
# Session 24's first device call (one H100):
#   1. ZeRO-2 reduction options A/B, graphed, the two ZeRO-2 configurations of the session-21 sweep the model
#      missed most (ViT-L batch 32: -44 %, T5-L batch 8: +27 %) and ViT-L's anchor batch
#      (scripts/zero2_overlap_probe.py; overlap = the runtime's ZeRO-2, plain = without overlap_comm, which
#      session 24 had set over one rank until this A/B, noncontig = neither option) -> OUT/probe_<model>.jsonl,
#      OUT/probe_log.txt
#   2. the engine block's ZeRO-2 stage re-measured with that one-rank config (the other stages kept; not used: the
#      A/B kept overlap_comm) -> OUT/engine_<model>.json, OUT/engine_log.txt
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
probe vit-large 32:1:0,64:1:0 overlap,plain,noncontig 100
probe t5-large 8:1:0 overlap,plain 70
grep "\[probe\]" "$out/probe_log.txt"
for m in vit-large swin-base bert-large t5-large; do
  MASTER_PORT=29592 timeout 65 python autotune/profile_engine.py --model $m --model-profile profiles/h100/$m.json \
    --zero 2 --stage-seconds 8 --reps 6 --warmup 2 --no-update --out "$out/engine_$m.json" >> "$out/engine_log.txt" 2>&1
  echo "engine $m rc=$?" | tee -a "$out/engine_log.txt"
done
