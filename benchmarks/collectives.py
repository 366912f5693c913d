"""Gradient and parameter collectives on one backend, for choosing ``comm="auto"``.

    python benchmarks/collectives.py [--backend gloo] [--world-size 2] [--mb 200] [--rounds 5]

Spawns ``world-size`` ranks and times, interleaved round by round, each way of moving one flat
fp32 buffer of ``mb`` MiB: reduce-scatter and all-gather through shardadam's Communicator in
each mode (native collectives, a ring of isend/irecv, all_reduce / one broadcast per owner).
Rank 0 prints the median and best milliseconds and each one's ratio to the native collective.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardadam.comm import Communicator

MODES = ("native", "ring", "pairwise", "all_reduce")


def worker(rank: int, args: argparse.Namespace, store_path: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, args.world_size)
    dist.init_process_group(
        args.backend,
        store=store,
        rank=rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=300),
    )
    numel = args.mb * 2**20 // 4 // args.world_size * args.world_size
    flat = torch.randn(numel)
    shard = torch.empty(numel // args.world_size)
    comms = {mode: Communicator(dist.group.WORLD, mode) for mode in MODES}
    cases = {}
    for mode, c in comms.items():
        cases[f"reduce-scatter ({mode})"] = lambda c=c: c.reduce_scatter_mean_(flat, shard)
        cases[f"all-gather ({mode})"] = lambda c=c: c.all_gather_(flat)
    times = {name: [] for name in cases}
    for run in cases.values():
        run()  # warm up connections and buffers
    for _ in range(args.rounds):
        for name, run in cases.items():
            dist.barrier()
            start = time.perf_counter()
            run()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        size = f"{args.mb} MiB fp32, {args.rounds} rounds"
        print(f"{args.backend}, world size {args.world_size}, {size}")
        print("| collective | median ms | best ms | time vs native |")
        print("|---|---:|---:|---:|")
        for name, samples in times.items():
            kind = name.split(" (")[0]
            native = statistics.median(times[f"{kind} (native)"])
            median = statistics.median(samples)
            print(
                f"| {name} | {median * 1e3:.0f} | {min(samples) * 1e3:.0f} | "
                f"{median / native:.2f}x |"
            )
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, os.path.join(tmp, "store")), nprocs=args.world_size)


if __name__ == "__main__":
    main()
