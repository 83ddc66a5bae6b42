#!/usr/bin/env bash
# A/B of one sweep process against a fresh process per configuration, on one GPU machine (session 17). Session
# 16's ViT-L runs, each in a fresh process, were faster than session 14's shared sweep process in all 7, but on
# another machine; this runs the same configurations both ways on one machine, alternating (ORDER: MODEL:shared|
# fresh ..., default shared fresh fresh shared, so a linear drift of the machine falls on both equally). Under OUT_DIR:
#   configs.json      the configurations: the anchor batch with ZeRO-1 first (so in a shared process the others run
#                     after another configuration, as in a sweep), then ones where the two sessions differed; ORDER
#                     may also name t5-large, whose list is there too
#   shared.jsonl      scripts/sweep_single_gpu.py records, every configuration of a round in one process
#   fresh.jsonl       the same, each configuration in a process of its own
#   log_shared.txt, log_fresh.txt, gpu.csv (nvidia-smi every second)
# Compare: python scripts/sweep_compare.py --a OUT_DIR/shared.jsonl --b OUT_DIR/fresh.jsonl --names shared,fresh
# TAR=FILE: a tar of OUT_DIR written after each round, so a call cut by its time limit returns the rounds done.
# Usage: [ORDER="vit-large:shared vit-large:fresh ..."] [STEPS=9] [TAR=FILE] bash scripts/gpu_process_ab.sh OUT_DIR
set -u
out=$(mkdir -p "${1:?usage: gpu_process_ab.sh OUT_DIR}" && cd "$1" && pwd)
export MASTER_ADDR=127.0.0.1
pack() { if [ -n "${TAR:-}" ]; then tar czf "$TAR.tmp" -C "$out" . && mv "$TAR.tmp" "$TAR"; fi; }
b() { echo "{\"bsz\": $1, \"chunks\": $2, \"ckpt\": 0, \"zero\": $3, \"precision\": \"bf16\"}"; }
cat > "$out/configs.json" <<JSON
{"vit-large": [$(b 64 1 1), $(b 32 1 0), $(b 64 2 0), $(b 16 1 1), $(b 64 2 1)],
 "t5-large": [$(b 16 1 1), $(b 8 1 1), $(b 16 2 0), $(b 4 1 1), $(b 16 2 1)]}
JSON
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,memory.used \
  --format=csv,noheader -l 1 > "$out/gpu.csv" 2>&1 & smi=$!
trap 'kill $smi 2>/dev/null' EXIT
for entry in ${ORDER:-vit-large:shared vit-large:fresh vit-large:fresh vit-large:shared}; do
  model=${entry%%:*} variant=${entry##*:}
  case $variant in shared|fresh) ;; *) echo "[ab] $entry: the variant must be shared or fresh"; exit 2 ;; esac
  n=$(python -c "import json,sys; print(len(json.load(open(sys.argv[1]))[sys.argv[2]]))" "$out/configs.json" "$model")
  t0=$(date +%s)
  # --only runs the listed configurations in this one process, in order (without it sweep_single_gpu.py would put
  # the first 3, its calibration configurations, in processes of their own)
  if [ "$variant" = shared ]; then
    MASTER_PORT=29557 python scripts/sweep_single_gpu.py --models "$model" --configs "$out/configs.json" \
      --precisions bf16 --steps "${STEPS:-9}" --only "$(seq -s, 0 $((n - 1)))" --out "$out/shared.jsonl"
  else
    for i in $(seq 0 $((n - 1))); do
      MASTER_PORT=29557 python scripts/sweep_single_gpu.py --models "$model" --configs "$out/configs.json" \
        --precisions bf16 --steps "${STEPS:-9}" --only "$i" --out "$out/fresh.jsonl" || exit 1
    done
  fi >> "$out/log_$variant.txt" 2>&1 || echo "[ab] $entry failed: $(tail -1 "$out/log_$variant.txt")"
  echo "[ab] $entry: $(( $(date +%s) - t0 )) s"
  grep '^\[sweep\]' "$out/log_$variant.txt" | tail -"$n"
  pack
done
