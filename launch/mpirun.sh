#!/usr/bin/env bash
# Train under MPI: `mpiexec -n NPROC python -m shardadam.train`; every argument is passed on to
# it untouched (Hydra's overrides and flags: --multirun, --cfg job ...). shardadam.bootstrap
# recognises the MPI launch and uses mpi4py to find the rank and world size and to share a
# torch.distributed rendezvous (pip install 'shardadam[mpi]').
#
#   launch/mpirun.sh trainer.steps=50                  # 2 ranks on this host
#   NPROC=4 launch/mpirun.sh optimizer.learning_rate=3e-4
#   NPROC=16 MPIEXEC_FLAGS="-f hostfile -ppn 8" launch/mpirun.sh ...   # MPICH, several hosts
#
# Environment:
#   NPROC          number of ranks (default 2)
#   PYTHON         the interpreter (default: python on PATH, e.g. the active venv's)
#   MPIEXEC        the launcher (default: the mpiexec next to PYTHON, as the `mpich` wheel
#                  installs it into a venv, else mpiexec on PATH). It must belong to the MPI
#                  that mpi4py was built against; the bootstrap refuses a mismatch.
#   MPIEXEC_FLAGS  extra launcher flags, split on spaces (default none; e.g. Open MPI as root
#                  needs --allow-run-as-root, several hosts need a hostfile)
#   RUN_DIR        the run directory (default outputs/DATE/TIME, chosen here once), exported
#                  to the ranks as SHARDADAM_RUN_DIR, which configs/config.yaml's
#                  hydra.run.dir and hydra.sweep.dir read; an explicit hydra.run.dir=... or
#                  hydra.sweep.dir=... argument wins. MPICH passes the environment to every
#                  host; Open MPI only to this one: add -x SHARDADAM_RUN_DIR to MPIEXEC_FLAGS.
set -euo pipefail

PYTHON=$(command -v "${PYTHON:-python}")
NPROC=${NPROC:-2}
if [[ -z "${MPIEXEC:-}" ]]; then
    MPIEXEC=mpiexec
    [[ -x "$(dirname "$PYTHON")/mpiexec" ]] && MPIEXEC="$(dirname "$PYTHON")/mpiexec"
fi
read -r -a mpiexec_flags <<< "${MPIEXEC_FLAGS:-}"

# Every rank runs Hydra, and each would pick its own timestamped directory: choose one here,
# for configs/config.yaml's hydra.run.dir and hydra.sweep.dir (Hydra's arguments pass through
# untouched: flags such as --multirun work in any order).
export SHARDADAM_RUN_DIR="${RUN_DIR:-${SHARDADAM_RUN_DIR:-outputs/$(date +%Y-%m-%d/%H-%M-%S)}}"

exec "$MPIEXEC" -n "$NPROC" "${mpiexec_flags[@]}" \
    "$PYTHON" -m shardadam.train "$@"
