#!/usr/bin/env bash
# A/B of DeepSpeed's throughput timer on one GPU (session 14): the same configurations, on the same machine, with
# the code as it is (timer off: backends/deepspeed/config.py) and with a copy whose timer is on (as before session
# 13), in alternating fresh processes (ORDER: MODEL:on|off ...), so drift of the machine falls on both. Under OUT_DIR:
#   configs.json     the configurations (chunked ones, where the timer's synchronisation at each micro-batch
#                    boundary would cost most, and unchunked controls)
#   timer_on.jsonl, timer_off.jsonl   scripts/sweep_single_gpu.py records, one per configuration and process
#   log_on.txt, log_off.txt, gpu.csv (nvidia-smi every second)
# TAR=FILE: a tar of OUT_DIR written after each process, so a call cut by its time limit returns the parts done.
# Usage: [ORDER="vit-large:on vit-large:off ..."] [STEPS=9] [TAR=FILE] bash scripts/gpu_timer_ab.sh OUT_DIR
set -u
out=$(mkdir -p "${1:?usage: gpu_timer_ab.sh OUT_DIR}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1
pack() { if [ -n "${TAR:-}" ]; then tar czf "$TAR.tmp" -C "$out" . && mv "$TAR.tmp" "$TAR"; fi; }
on=$(mktemp -d)/timer_on
mkdir -p "$on" && cp -r autotune backends model_zoo scripts profiles train.py "$on/"
sed -i 's/"timers": {"throughput": {"enabled": False}}/"timers": {"throughput": {"enabled": True}}/' \
    "$on/backends/deepspeed/config.py"
grep -q '"throughput": {"enabled": True}' "$on/backends/deepspeed/config.py" \
  || { echo "the timer line of backends/deepspeed/config.py changed: update this script's sed"; exit 1; }
b() { echo "{\"bsz\": $1, \"chunks\": $2, \"ckpt\": 0, \"zero\": $3, \"precision\": \"bf16\"}"; }
cat > "$out/configs.json" <<JSON
{"vit-large": [$(b 64 1 1), $(b 64 1 0), $(b 64 2 0), $(b 64 4 0), $(b 64 2 1), $(b 128 4 1), $(b 128 2 0)],
 "t5-large": [$(b 16 1 1), $(b 16 4 0), $(b 16 2 0), $(b 32 2 1), $(b 4 1 0)]}
JSON
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,memory.used \
  --format=csv,noheader -l 1 > "$out/gpu.csv" 2>&1 & smi=$!
trap 'kill $smi 2>/dev/null' EXIT
for entry in ${ORDER:-vit-large:on vit-large:off t5-large:on t5-large:off vit-large:off vit-large:on t5-large:off t5-large:on}; do
  model=${entry%%:*} variant=${entry##*:}
  dir=.; [ "$variant" = on ] && dir=$on
  n=$(python -c "import json,sys; print(len(json.load(open(sys.argv[1]))[sys.argv[2]]))" "$out/configs.json" "$model")
  t0=$(date +%s)
  (cd "$dir" && MASTER_PORT=29556 python scripts/sweep_single_gpu.py --models "$model" --configs "$out/configs.json" \
      --precisions bf16 --steps "${STEPS:-9}" --only "$(seq -s, 0 $((n - 1)))" --out "$out/timer_$variant.jsonl") \
      >> "$out/log_$variant.txt" 2>&1 || echo "[ab] $entry failed: $(tail -1 "$out/log_$variant.txt")"
  echo "[ab] $entry: $(( $(date +%s) - t0 )) s"
  grep '^\[sweep\]' "$out/log_$variant.txt" | tail -"$n"
  pack
done
