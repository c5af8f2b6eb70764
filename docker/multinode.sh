#!/usr/bin/env bash
# Multi-node launch of an fvlm command inside the fvlm image: run this once on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 docker/multinode.sh <fvlm subcommand and its arguments>
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 docker/multinode.sh <fvlm subcommand and its arguments>
#
# torchrun starts GPUS_PER_NODE processes per node and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
# MASTER_PORT for each; fvlm's distributed commands read these (DeepSpeed initialises from them too).
# The container uses the host network so that the nodes reach each other (NCCL over the host's
# interfaces; set NCCL_SOCKET_IFNAME if the nodes have several). DATA and OUT are mounted at the same
# path on every node: a shared file system, or identical copies.
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, this node's rank (0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of node 0}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}"
IMAGE="${IMAGE:-fvlm:latest}"
DATA="${DATA:-/data}"
OUT="${OUT:-/runs}"

exec docker run --rm --gpus all --network host --ipc host \
    -e NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-}" -e NCCL_DEBUG="${NCCL_DEBUG:-WARN}" \
    -v "$DATA:$DATA" -v "$OUT:$OUT" \
    "$IMAGE" \
    torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
             --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
             -m pipelines "$@"
