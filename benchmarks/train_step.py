"""Training-step time and memory of shardadam against the optimizers people use instead.

    python benchmarks/train_step.py [--world-sizes 1 2 4] [--rounds 2] [--steps 20]

Trains a ~50M-parameter MLP with uneven layer sizes on gloo ranks (CPU) and prints one table
per world size: median and best step time, optimizer-step time, optimizer-state bytes per rank,
peak RSS of rank 0 and the final loss, for
  - shardadam stage 1 and stage 2 (compiled update, comm="auto");
  - DDP + torch.optim.AdamW (foreach, fused);
  - DDP + ZeroRedundancyOptimizer(AdamW, fused);
  - FSDP2 (fully_shard per layer) + AdamW.
Every implementation runs in fresh processes (so that peak RSS is its own), interleaved round by
round with the others because the machine is noisy; a fixed CPU probe (a matmul) is timed
beside each run. All start from the same weights and see the same data, with lr 1e-4 and no
weight decay, so their losses agree up to Adam's epsilon placement.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

IMPLS = [
    "shardadam stage 1",
    "shardadam stage 2",
    "DDP + AdamW foreach",
    "DDP + AdamW fused",
    "ZeRO-1 (AdamW fused)",
    "FSDP2 + AdamW",
]
WIDTHS = [1024, 7000, 1500, 3000, 2500, 4000, 1900, 1024]
BATCH, LR = 16, 1e-4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * rank + step)
    return torch.randn(BATCH, WIDTHS[0], generator=gen), torch.randn(
        BATCH, WIDTHS[-1], generator=gen
    )


def state_bytes(opt: torch.optim.Optimizer) -> int:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if hasattr(opt, "memory_report"):
        return opt.memory_report()["optimizer_state"]
    inner = opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def build(impl: str, world_size: int):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from shardadam import ShardedAdam

    model = make_model()
    if impl.startswith("shardadam"):
        # "shardadam stage N", optionally followed by "comm=MODE" and/or "overlap"
        stage = 1 if "stage 1" in impl else 2
        comm = impl.split("comm=")[1].split()[0] if "comm=" in impl else "auto"
        overlap = "overlap" in impl
        opt = ShardedAdam(
            model.parameters(),
            learning_rate=LR,
            stage=stage,
            comm=comm,
            overlap_param_gather=overlap,
        )
        return model, opt
    if impl == "FSDP2 + AdamW":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, foreach=True)
    wrapped = DDP(model) if world_size > 1 else model
    if impl.startswith("ZeRO"):
        opt = ZeroRedundancyOptimizer(
            model.parameters(),
            optimizer_class=torch.optim.AdamW,
            lr=LR,
            weight_decay=0.0,
            fused=True,
        )
        return wrapped, opt
    fused = impl.endswith("fused")
    opt = torch.optim.AdamW(
        model.parameters(), lr=LR, weight_decay=0.0, fused=fused, foreach=not fused
    )
    return wrapped, opt


def probe_s() -> float:
    a = torch.randn(1024, 1024)
    start = time.perf_counter()
    for _ in range(4):
        a @ a
    return time.perf_counter() - start


def worker(rank: int, world_size: int, impl: str, steps: int, store_path: str, out: str) -> None:
    torch.set_num_threads(max(1, 2 // world_size))
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, world_size),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=600),
    )
    try:
        model, opt = build(impl, world_size)
        warmup = 3
        step_s, opt_s, loss = [], [], None
        probe = probe_s()
        for step in range(steps):
            x, y = batch(rank, step)
            dist.barrier()
            start = time.perf_counter()
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            before_step = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            if step >= warmup:
                step_s.append(end - start)
                opt_s.append(end - before_step)
        mean_loss = torch.tensor([loss.item()])
        dist.all_reduce(mean_loss)
        if rank == 0:
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            torch.save(
                {
                    "step_s": step_s,
                    "opt_s": opt_s,
                    "state_bytes": state_bytes(opt),
                    "peak_rss": peak_rss,
                    "loss": mean_loss.item() / world_size,
                    "probe_s": probe,
                },
                out,
            )
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run(impl: str, world_size: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(
            worker,
            args=(world_size, impl, steps, os.path.join(tmp, "store"), out),
            nprocs=world_size,
        )
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--impls", nargs="+", default=IMPLS)
    args = parser.parse_args()
    numel = sum(p.numel() for p in make_model().parameters())
    print(f"model: {numel / 1e6:.1f}M parameters, widths {WIDTHS}, batch {BATCH} per rank")
    for world_size in args.world_sizes:
        results: dict[str, list[dict]] = {impl: [] for impl in args.impls}
        for _ in range(args.rounds):
            for impl in args.impls:
                results[impl].append(run(impl, world_size, args.steps))
        fused = (
            statistics.median(s for r in results.get("DDP + AdamW fused", []) for s in r["step_s"])
            if "DDP + AdamW fused" in results
            else None
        )
        print(f"\nworld size {world_size} (gloo, {args.rounds} rounds x {args.steps} steps)")
        print(
            "| implementation | median step ms | best step ms | vs DDP+fused | optimizer step ms "
            "| optimizer state / rank MB | peak RSS MB | final loss | CPU probe ms |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for impl, runs in results.items():
            step_s = [s for r in runs for s in r["step_s"]]
            opt_s = [s for r in runs for s in r["opt_s"]]
            median = statistics.median(step_s)
            ratio = f"{fused / median:.2f}x" if fused else "-"
            print(
                f"| {impl} | {median * 1e3:.0f} | {min(step_s) * 1e3:.0f} | {ratio} | "
                f"{statistics.median(opt_s) * 1e3:.0f} | {runs[0]['state_bytes'] / 2**20:.1f} | "
                f"{max(r['peak_rss'] for r in runs) / 2**20:.0f} | {runs[-1]['loss']:.6f} | "
                f"{statistics.median(r['probe_s'] for r in runs) * 1e3:.0f} |"
            )


if __name__ == "__main__":
    main()
