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
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
[ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME
MODEL=${MODEL:-t5-large}
PLAN=${PLAN:-configs/${MODEL}_16gpus.json}
HOSTFILE=${HOSTFILE:-hostfile}
# The hostfile gives the world in both modes (DeepSpeed's --no_ssh needs it too); GPUS_PER_NODE, when set,
# overrides its slots (deepspeed --num_gpus).
LAUNCH=(--hostfile "$HOSTFILE" --num_nodes 2 ${GPUS_PER_NODE:+--num_gpus "$GPUS_PER_NODE"})
CHECK=()
if [ "${NO_SSH:-0}" = 1 ]; then
  : "${NODE_RANK:?set NODE_RANK to 0 on the first node and 1 on the second}"
  LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
  CHECK=(--port 0)                               # no ssh: host names must resolve, nothing to connect to
fi
# A bad hostfile (unknown or unreachable host, slots != the plan's world size) ends here in seconds with one
# line, instead of a traceback or ranks waiting in the rendezvous for a host that never comes.
"${PYTHON:-python3}" -m backends.launch --hostfile "$HOSTFILE" --plan "$PLAN" --num_nodes 2 \
    ${GPUS_PER_NODE:+--num_gpus "$GPUS_PER_NODE"} "${CHECK[@]}"
exec deepspeed "${LAUNCH[@]}" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" train.py \
    --model "$MODEL" --task "${TASK:-seq2seq}" --galvatron-plan "$PLAN" --steps "${STEPS:-20}" --lr "${LR:-1e-4}" \
    ${METRICS:+--metrics-file "$METRICS"} "$@"
