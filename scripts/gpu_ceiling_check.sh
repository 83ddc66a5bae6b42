#!/usr/bin/env bash
# Share of the 734.5 TFLOP/s bf16 GEMM ceiling (shared/reference/anchors.md) reached by the plan the search
# emits for one 80 GB H100, trained by train.py as emitted (eager) and with --compile MODE for each of MODES,
# each in a fresh process on one host.
# Usage: [MODES="eager default reduce-overhead"] bash scripts/gpu_ceiling_check.sh OUT_DIR [MODELS]
#        (default MODELS: bert-large,vit-large; default MODES: eager default)
# BATCH=N trains the one-strategy plan at global batch N (ZeRO-1, what the search emits for one GPU) instead
# of the searched plan, e.g. the anchors' batch sizes.
set -u
out=${1:?usage: gpu_ceiling_check.sh OUT_DIR [MODELS]}
models=${2:-bert-large,vit-large}
steps=${STEPS:-15}
modes=${MODES:-eager default}
mkdir -p "$out"
export MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29543}
for m in ${models//,/ }; do
  if [ -n "${BATCH:-}" ]; then
    plan="--global-batch-size $BATCH --zero-stage 1"; tag="${m}_b$BATCH"
  else
    python autotune/search.py --model "$m" --gpus 1 --hardware 1xH100 --gpu-memory-gb 80 \
        --model-profile "profiles/h100/$m.json" --out "$out/plan_$m.json" --quiet > "$out/search_$m.txt" || continue
    plan="--galvatron-plan $out/plan_$m.json"; tag=$m
  fi
  for mode in $modes; do
    flag=""; [ "$mode" = eager ] || flag="--compile $mode"
    timeout 300 python train.py --model "$m" $plan --steps "$steps" $flag \
        --metrics-file "$out/ceiling_${tag}_$mode.jsonl" > "$out/log_${tag}_$mode.txt" 2>&1 \
      || echo "[ceiling] $tag $mode failed: $(tail -1 "$out/log_${tag}_$mode.txt")"
  done
done
python - "$out" <<'EOF'
import glob, json, os, sys
sys.path.insert(0, os.getcwd())
from autotune.validate import read_summary_record
CEILING = 734.5   # TFLOP/s, bf16 GEMM, anchors.md
for path in sorted(glob.glob(os.path.join(sys.argv[1], "ceiling_*.jsonl"))):
    m = read_summary_record(path)["measured"]
    print(f"[ceiling] {os.path.basename(path)[8:-6]}: {m['samples_per_s']:.1f} samples/s, "
          f"{m['tflops_per_gpu']:.1f} TFLOP/s = {100 * m['tflops_per_gpu'] / CEILING:.1f} % of the GEMM ceiling, "
          f"peak {m['stage_peak_memory_mb'][0]:.0f} MB, final loss {m['final_loss']}")
EOF
