#!/usr/bin/env bash
# T5 on 2 nodes x 8 GPUs under a searched plan (Galvatron's models/t5/scripts/train_t5_hp_layerwise_dist_2nodes.sh).
# Run on node 0; DeepSpeed starts the ranks of both nodes over ssh from a hostfile, one line per node:
#   node0-address slots=8
#   node1-address slots=8
# Make the plan for 16 GPUs first, e.g.
#   python autotune/search.py --model t5-large --gpus 16 --nodes 2 --hardware profiles/hardware-2x8gpus.json \
#       --out configs/t5-large_16gpus.json
# Without ssh between the nodes, run this on each node with NO_SSH=1 NODE_RANK=0|1 (DeepSpeed's --no_ssh; same hostfile).
# Usage: MASTER_ADDR=node0-address [NCCL_SOCKET_IFNAME=eth0] [HOSTFILE=hostfile] [GPUS_PER_NODE=8] [MODEL=t5-large] \
#        [PLAN=configs/t5-large_16gpus.json] [STEPS=20] [LR=1e-4] scripts/train_t5_hp_layerwise_dist_2nodes.sh [flags]
export MODEL=${MODEL:-t5-large}
exec "$(dirname "$0")/lib/dist_2nodes.sh" "$@"
