#!/usr/bin/env bash
# Hardware profile of one 8-GPU node (Galvatron's scripts/profile_env_8gpus.sh): all-reduce bus bandwidth
# per group, p2p per pipeline degree, all-gather / reduce-scatter fits, overlap slowdown, GEMM ceiling.
# Usage: scripts/profile_env_8gpus.sh [OUT.json] [extra profile_hardware.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-profiles/hardware-1x8gpus.json}
shift || true
exec torchrun --standalone --nproc_per_node 8 autotune/profile_hardware.py --out "$OUT" "$@"
