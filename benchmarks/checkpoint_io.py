"""Checkpoint save and load time of shardadam.checkpoint against the ways people save instead.

    python benchmarks/checkpoint_io.py [--world-size 2] [--rounds 3] [--width 2048]

On gloo ranks (CPU), a ~20M-parameter MLP (fp32) after one training step, saved to and loaded
from local disk:
  - shardadam.checkpoint: every rank writes its shard (and the same elements of the
    parameters) in parallel; loading reads only what each rank's shard needs;
  - DDP + AdamW with torch.distributed.checkpoint (DCP): ``get_state_dict`` of the model and
    the optimizer, ``dcp.save`` / ``dcp.load`` (replicated tensors are de-duplicated);
  - consolidation on rank 0 + torch.save: ``consolidated_state_dict()`` (what
    ZeroRedundancyOptimizer users do) and ``torch.save`` of model and optimizer by rank 0.
Every save is made durable (DCP and shardadam fsync their files; the torch.save row fsyncs its
file). Rounds interleave the implementations because the machine is noisy; the table gives
medians, and ratios against DCP measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

IMPLS = ["shardadam.checkpoint", "DDP + AdamW + DCP", "rank-0 consolidate + torch.save"]


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width), nn.Tanh(),
        nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width),
    )  # fmt: skip


def build(impl: str, width: int):
    from shardadam import ShardedAdam

    model = make_model(width)
    if impl == "DDP + AdamW + DCP":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    else:
        opt = ShardedAdam(model.parameters(), learning_rate=1e-4, jit_compile=False)
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def save_and_load(impl: str, model, opt, directory: str) -> tuple[float, float]:
    rank = dist.get_rank()
    dist.barrier()
    started = time.perf_counter()
    if impl == "shardadam.checkpoint":
        from shardadam import checkpoint

        checkpoint.save(directory, model=model, optimizer=opt, step=1)
    elif impl == "DDP + AdamW + DCP":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    else:
        state = opt.consolidated_state_dict(to_rank=0)
        if rank == 0:
            path = os.path.join(directory, "checkpoint.pt")
            os.makedirs(directory, exist_ok=True)
            with open(path, "wb") as file:
                torch.save({"model": model.state_dict(), "optim": state}, file)
                file.flush()
                os.fsync(file.fileno())
    dist.barrier()
    saved = time.perf_counter() - started

    started = time.perf_counter()
    if impl == "shardadam.checkpoint":
        checkpoint.load(directory, model=model, optimizer=opt)
    elif impl == "DDP + AdamW + DCP":
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        # Every rank reads the whole file and keeps its shard (the one-process form loads at
        # any world size).
        state = torch.load(os.path.join(directory, "checkpoint.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
    dist.barrier()
    return saved, time.perf_counter() - started


def worker(rank: int, world_size: int, store_path: str, impl: str, width: int, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    try:
        model, opt = build(impl, width)
        directory = os.path.join(out, "checkpoint")
        saved, loaded = save_and_load(impl, model, opt, directory)
        if rank == 0:
            size = sum(
                os.path.getsize(os.path.join(root, f))
                for root, _, files in os.walk(directory)
                for f in files
            )
            torch.save({"save_s": saved, "load_s": loaded, "bytes": size}, f"{out}/result.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_once(impl: str, world_size: int, width: int) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as out:
        store = os.path.join(out, "store")
        mp.spawn(worker, args=(world_size, store, impl, width, out), nprocs=world_size)
        result = torch.load(f"{out}/result.pt")
        shutil.rmtree(os.path.join(out, "checkpoint"), ignore_errors=True)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for _ in range(args.rounds):
        for impl in IMPLS:
            results[impl].append(run_once(impl, args.world_size, args.width))
    params = sum(p.numel() for p in make_model(args.width).parameters())
    print(f"{params / 1e6:.1f}M parameters, world size {args.world_size}, {args.rounds} rounds\n")
    columns = ["save s (median)", "load s (median)", "save vs DCP", "load vs DCP", "MB on disk"]
    print("| implementation | " + " | ".join(columns) + " |")
    print("|---|---:|---:|---:|---:|---:|")
    reference = {
        k: statistics.median(r[k] for r in results["DDP + AdamW + DCP"])
        for k in ("save_s", "load_s")
    }
    for impl in IMPLS:
        save = statistics.median(r["save_s"] for r in results[impl])
        load = statistics.median(r["load_s"] for r in results[impl])
        print(
            f"| {impl} | {save:.3f} | {load:.3f} | {reference['save_s'] / save:.2f}x | "
            f"{reference['load_s'] / load:.2f}x | {results[impl][0]['bytes'] / 2**20:.0f} |"
        )


if __name__ == "__main__":
    main()
