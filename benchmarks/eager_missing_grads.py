"""The eager step (jit_compile=False) with a parameter that has no gradient, against the same
step with every gradient present (issue 11: at most 1.5x).

    python benchmarks/eager_missing_grads.py [--rounds 3]

A 6 x Linear(1024, 1024) model in one process; "frozen" leaves the first layer's bias without
a gradient (it stays in the flat buffer, as a frozen or unused parameter does). Rounds alternate
the two, and the ratio of medians is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from shardadam import ShardedAdam


def median_step_s(frozen: bool, steps: int = 12) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(6)])
    if frozen:
        model[0].bias.requires_grad_(False)
    opt = ShardedAdam(model.parameters(), jit_compile=False)
    times = []
    for _ in range(steps):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)
        began = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - began)
    return statistics.median(times[2:])  # the first steps allocate the state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    every, frozen = [], []
    for _ in range(rounds):
        every.append(median_step_s(False))
        frozen.append(median_step_s(True))
    a, b = statistics.median(every), statistics.median(frozen)
    print(f"every gradient: {a * 1e3:.1f} ms; one without: {b * 1e3:.1f} ms; ratio {b / a:.2f}x")


if __name__ == "__main__":
    main()
