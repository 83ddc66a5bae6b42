#!/usr/bin/env bash
# Shared body of scripts/train_<family>_hp_layerwise_dist_2nodes.sh: 2 nodes x N GPUs under a searched plan.
# Run on node 0; DeepSpeed starts the ranks of both nodes over ssh from a hostfile, one line per node
# ("node0-address slots=8"). Without ssh between the nodes, run on each node with NO_SSH=1 NODE_RANK=0|1
# (DeepSpeed's --no_ssh; same hostfile). Variables: MASTER_ADDR (required), MODEL (set by the wrapper),
# PLAN, HOSTFILE, GPUS_PER_NODE, NCCL_SOCKET_IFNAME, TASK, STEPS, LR, METRICS, MASTER_PORT, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
[ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME
MODEL=${MODEL:?the family wrapper sets MODEL}
PLAN=${PLAN:-configs/${MODEL}_16gpus.json}
HOSTFILE=${HOSTFILE:-hostfile}
# The hostfile gives the world in both modes (DeepSpeed's --no_ssh needs it too); GPUS_PER_NODE, when set,
# overrides its slots (deepspeed --num_gpus). The check and the launch read the same arguments.
HOSTS=(--hostfile "$HOSTFILE" --num_nodes 2 ${GPUS_PER_NODE:+--num_gpus "$GPUS_PER_NODE"})
LAUNCH=()
CHECK=()
if [ "${NO_SSH:-0}" = 1 ]; then
  : "${NODE_RANK:?set NODE_RANK to 0 on the first node and 1 on the second}"
  LAUNCH=(--no_ssh --node_rank "$NODE_RANK")
  CHECK=(--port 0)                               # no ssh: host names must resolve, nothing to connect to
fi
# A bad hostfile (unknown or unreachable host, slots != the plan's world size) ends here in seconds with one
# line, instead of a traceback or ranks waiting in the rendezvous for a host that never comes.
"${PYTHON:-python3}" -m backends.launch "${HOSTS[@]}" --plan "$PLAN" "${CHECK[@]}"
exec deepspeed "${HOSTS[@]}" "${LAUNCH[@]}" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    train.py --model "$MODEL" ${TASK:+--task "$TASK"} --galvatron-plan "$PLAN" --steps "${STEPS:-20}" \
    --lr "${LR:-1e-4}" ${METRICS:+--metrics-file "$METRICS"} "$@"
