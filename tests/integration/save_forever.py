"""Two gloo ranks that train and save a checkpoint after every step until killed; each step is
saved twice, the second save replacing the first (Note [re-saving a step]).

Run as ``python -m tests.integration.save_forever ROOT``; rank 0 prints ``saving N`` before
each save and ``published N SECONDS`` after it.
"""

from __future__ import annotations

import sys
import time

import torch

from tests.distributed.spawn import run_ranks

WIDTH = 768  # about 1.2M parameters: a save writes ~25 MB, long enough to be killed in


def make():
    from shardadam import ShardedAdam

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, WIDTH)
    )
    opt = ShardedAdam(model.parameters(), use_ema=True, amsgrad=True, jit_compile=False)
    return model, opt


def save_forever(rank: int, world_size: int, root: str) -> None:
    from shardadam import checkpoint

    model, opt = make()
    step = 0
    while True:
        x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(rank * 1000 + step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        step += 1
        for _ in range(2):
            if rank == 0:
                print(f"saving {step}", flush=True)
            started = time.perf_counter()
            checkpoint.save(root, model=model, optimizer=opt, keep_last=2)
            if rank == 0:
                print(f"published {step} {time.perf_counter() - started:.4f}", flush=True)


if __name__ == "__main__":
    run_ranks(2, save_forever, sys.argv[1])
