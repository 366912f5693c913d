"""Run a function on N gloo ranks (FileStore rendezvous, short timeout) and collect results."""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(
    rank: int,
    world_size: int,
    store_path: str,
    out_dir: str,
    backend: str,
    timeout_s: float,
    fn: Callable,
    args,
):
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(
    world_size: int, fn: Callable, *args, backend: str = "gloo", timeout_s: float = 60
) -> list:
    """``fn(rank, world_size, *args)`` on each rank; returns the per-rank results in rank order.

    ``timeout_s`` bounds every collective: a mismatched or missing one fails instead of hanging.
    """
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        mp.spawn(
            _worker,
            args=(world_size, store_path, tmp, backend, timeout_s, fn, args),
            nprocs=world_size,
        )
        return [
            torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
