#!/usr/bin/env bash
# Train with torchrun: `python -m shardadam.train` on each rank; every argument is passed on
# to it untouched (Hydra's overrides and flags: --multirun, --cfg job, --config-dir DIR ...).
#
#   launch/torchrun.sh trainer.steps=50                          # 2 ranks on this node
#   launch/torchrun.sh --multirun optimizer.learning_rate=1e-3,3e-3   # a sweep, job by job
#   NPROC_PER_NODE=8 launch/torchrun.sh optimizer.learning_rate=3e-4
#   # Several nodes: the same command on every node.
#   NNODES=2 MASTER_ADDR=node0 NPROC_PER_NODE=8 \
#       RUN_DIR=outputs/big-run launch/torchrun.sh trainer.steps=1000
#
# Environment:
#   NPROC_PER_NODE  ranks on this node (default 2; one per GPU on a GPU node)
#   NNODES          number of nodes (default 1: `--standalone`, nothing else needed)
#   MASTER_ADDR     address of the node that hosts the c10d rendezvous (required if NNODES > 1).
#                   The rendezvous numbers the nodes itself (torchrun ignores --node_rank with
#                   c10d), so no NODE_RANK is needed.
#   MASTER_PORT     its TCP port (default 29500)
#   RDZV_ID         a name shared by the nodes of one run (default shardadam)
#   RUN_DIR         the run directory (default outputs/DATE/TIME, chosen here once), exported
#                   to the ranks as SHARDADAM_RUN_DIR, which configs/config.yaml's
#                   hydra.run.dir and hydra.sweep.dir read (a sweep's jobs go to RUN_DIR/0,
#                   RUN_DIR/1, ...); an explicit hydra.run.dir=... or hydra.sweep.dir=...
#                   argument wins. With several nodes, give the same RUN_DIR to all of them:
#                   each node's clock picks its own default.
#   PYTHON          the interpreter (default: python on PATH, e.g. the active venv's)
set -euo pipefail

PYTHON=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
NNODES=${NNODES:-1}

# Every rank runs Hydra, and each would pick its own timestamped directory: choose one here,
# for configs/config.yaml's hydra.run.dir and hydra.sweep.dir (Hydra's arguments pass through
# untouched: flags such as --multirun work in any order).
export SHARDADAM_RUN_DIR="${RUN_DIR:-${SHARDADAM_RUN_DIR:-outputs/$(date +%Y-%m-%d/%H-%M-%S)}}"

if [[ "$NNODES" -gt 1 ]]; then
    : "${MASTER_ADDR:?set MASTER_ADDR to the address of the rendezvous node when NNODES > 1}"
    topology=(
        --nnodes="$NNODES"
        --rdzv_id="${RDZV_ID:-shardadam}"
        --rdzv_backend=c10d
        --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
    )
else
    topology=(--standalone)
fi

exec "$PYTHON" -m torch.distributed.run "${topology[@]}" --nproc_per_node="$NPROC_PER_NODE" \
    -m shardadam.train "$@"
