#!/usr/bin/env bash
# One GPU call: train.py at the anchor batch sizes (shared/reference/anchors.md) with its default engine
# (ZeRO-1 = DeepSpeed's BF16_Optimizer), the same with --compile, the ZeRO-0 bf16 path (DeepSpeed's
# FP16_Optimizer in bf16) for BERT-L and ViT-L, and the plain-HF loop of scripts/bench_engine_modes.py,
# all on the same host. Usage: bash scripts/gpu_anchor_check.sh OUT_DIR
set -u
out=${1:?usage: gpu_anchor_check.sh OUT_DIR}
mkdir -p "$out"
models=bert-large,vit-large,t5-large,swin-base
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
timeout 200 python scripts/sweep_single_gpu.py --models $models --limit 1 --steps 15 --out "$out/anchors_train_py.jsonl" > "$out/log_default.txt" 2>&1
timeout 60 python scripts/sweep_single_gpu.py --models bert-large,vit-large --skip 1 --limit 2 --steps 12 --out "$out/anchors_train_py.jsonl" >> "$out/log_default.txt" 2>&1
timeout 100 python scripts/bench_engine_modes.py --models $models --modes hf --steps 12 --out "$out/hf_same_host.jsonl" > "$out/log_hf.txt" 2>&1
timeout 200 python scripts/sweep_single_gpu.py --models $models --limit 1 --steps 15 --train-args=--compile --out "$out/anchors_train_py_compile.jsonl" > "$out/log_compile.txt" 2>&1
grep -h "\[sweep\]\|samples/s" "$out"/log_*.txt | tail -20
