"""One rank of the MPI bootstrap test: ``mpiexec -n 2 python tests/integration/mpi_allreduce.py``.

Starts torch.distributed through :func:`shardadam.bootstrap.distributed_from_env` (gloo),
all-reduces the rank, and prints ``rank R/W local L sum S``. ``--expected-world-size N`` passes
N on, to check that a launch with another number of ranks fails on every rank.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from shardadam.bootstrap import distributed_from_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expected-world-size", type=int, default=None)
    args = parser.parse_args()
    with distributed_from_env(
        timeout_s=60.0, backend="gloo", expected_world_size=args.expected_world_size
    ) as ctx:
        total = torch.tensor([ctx.rank], dtype=torch.int64)
        dist.all_reduce(total)
        print(
            f"rank {ctx.rank}/{ctx.world_size} local {ctx.local_rank} sum {int(total)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
