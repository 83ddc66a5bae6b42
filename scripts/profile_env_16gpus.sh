#!/usr/bin/env bash
# Hardware profile of two 8-GPU nodes (Galvatron's scripts/profile_env_16gpus.sh). Run the same command
# on both nodes; node 0 writes the file.
#   MASTER_ADDR=node0-address NODE_RANK=0 NCCL_SOCKET_IFNAME=eth0 scripts/profile_env_16gpus.sh   # node 0
#   MASTER_ADDR=node0-address NODE_RANK=1 NCCL_SOCKET_IFNAME=eth0 scripts/profile_env_16gpus.sh   # node 1
# Usage: scripts/profile_env_16gpus.sh [OUT.json] [extra profile_hardware.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
: "${NODE_RANK:?set NODE_RANK to 0 on the first node and 1 on the second}"
: "${NCCL_SOCKET_IFNAME:?set NCCL_SOCKET_IFNAME to the network interface between the nodes (see ip addr)}"
export NCCL_SOCKET_IFNAME
OUT=${1:-profiles/hardware-2x8gpus.json}
shift || true
exec torchrun --nnodes 2 --nproc_per_node 8 --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" autotune/profile_hardware.py --out "$OUT" --gpus-per-node 8 "$@"
