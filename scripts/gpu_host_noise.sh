#!/usr/bin/env bash
# Where does the step-time spread of launch-bound one-GPU runs come from (session 12)? Under OUT_DIR:
#   machine.jsonl  the machine's CPU use, steal, CPU clock and a Python speed probe every 0.25 s
#                  (scripts/host_speed_repeat.py --sample-machine)
#   gpu.csv        the GPU's SM / memory clocks, power and utilisation every 250 ms (nvidia-smi)
#   repeat_*.jsonl each of REPEATS (MODEL:BSZ:ZERO:PROCESSES ...) in fresh processes with host probes before
#                  and after training (scripts/host_speed_repeat.py; train.py's step records carry host_s,
#                  host_cpu_s and time)
#   sweep.jsonl    then SWEEP_MODELS' built-in bf16 sweeps (scripts/sweep_single_gpu.py SWEEP_ARGS) until
#                  SWEEP_SECONDS run out
# Usage: [REPEATS="swin-base:16:1:6 bert-large:8:0:4"] [SWEEP_MODELS=t5-large] [SWEEP_ARGS=] [SWEEP_SECONDS=380]
#        bash scripts/gpu_host_noise.sh OUT_DIR
set -u
out=${1:?usage: gpu_host_noise.sh OUT_DIR}
mkdir -p "$out"
export MASTER_ADDR=127.0.0.1
python scripts/host_speed_repeat.py --sample-machine "$out/machine.jsonl" & sampler=$!
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,temperature.gpu \
  --format=csv,noheader -lms 250 > "$out/gpu.csv" 2>&1 & smi=$!
trap 'kill $sampler $smi 2>/dev/null' EXIT
for spec in ${REPEATS:-swin-base:16:1:6 bert-large:8:0:4}; do
  IFS=: read -r model bsz zero n <<< "$spec"
  t0=$(date +%s)
  MASTER_PORT=29552 python scripts/host_speed_repeat.py --model "$model" --bsz "$bsz" --zero "$zero" --steps 13 \
      --repeats "$n" --out "$out/repeat_$model.jsonl" > "$out/repeat_${model}_log.txt" 2>&1 \
    || echo "[noise] $model failed: $(tail -1 "$out/repeat_${model}_log.txt")"
  grep '^\[host-speed\]' "$out/repeat_${model}_log.txt"
  echo "[noise] $model: $(( $(date +%s) - t0 )) s"
done
[ -n "${SWEEP_MODELS-t5-large}" ] || exit 0
MASTER_PORT=29553 timeout "${SWEEP_SECONDS:-380}" python scripts/sweep_single_gpu.py \
    --models "${SWEEP_MODELS:-t5-large}" --precisions bf16 --steps 9 ${SWEEP_ARGS:-} --out "$out/sweep.jsonl" \
    > "$out/sweep_log.txt" 2>&1 || echo "[noise] sweep stopped: $(tail -1 "$out/sweep_log.txt")"
grep '^\[sweep\]' "$out/sweep_log.txt" | tail -30
