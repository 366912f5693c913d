"""One process: ShardedAdam's step() and peak memory against plain fused AdamW (issue 11).

    python benchmarks/one_process.py [--rounds 25] [--steps 8]

Two measurements on train_step.py's 49.2M-parameter MLP (batch 32), fp32, no process group:
  1. step() time, both optimizers in this one process on two copies of the model, interleaved
     step by step (the machine is noisy; fresh processes also differ in how their memory is
     laid out, which moves a memory-bound step by several percent): median and best, and
     shardadam's speed relative to fused AdamW;
  2. resident memory, each optimizer in a fresh process (peak RSS is a high-water mark): RSS
     after the model and after the optimizer are built, the peak after the first backward and
     after all steps, for fused AdamW, ShardedAdam compiled and ShardedAdam with
     jit_compile=False. Their differences split shardadam's extra peak into what the compiler
     keeps resident (compiled minus eager) and what the flat gradient buffer costs during
     backward (eager minus fused AdamW: autograd's gradient of one parameter exists beside the
     buffer until the hook has copied it in, and freed gradients the allocator keeps), which
     the largest parameter's gradient bounds from below.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import train_step

MB = 2**20
KINDS = ["AdamW fused", "shardadam compiled", "shardadam eager"]


def make_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "AdamW fused":
        return torch.optim.AdamW(model.parameters(), lr=train_step.LR, weight_decay=0, fused=True)
    from shardadam import ShardedAdam

    return ShardedAdam(
        model.parameters(), learning_rate=train_step.LR, jit_compile=kind.endswith("compiled")
    )


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = train_step.batch(0, 1, step)
    ((model(x) - y) ** 2).mean().backward()


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process, from /proc (Linux)."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def memory_child(kind: str, steps: int) -> dict[str, float]:
    model = train_step.make_model()
    row = {"model": rss_mb()[0]}
    opt = make_optimizer(kind, model)
    row["optimizer built"] = rss_mb()[0]
    for step in range(steps):
        train(model, opt, step)
        if step == 0:
            row["peak after 1st backward"] = rss_mb()[1]
        opt.step()
        opt.zero_grad()
    row["peak"] = rss_mb()[1]
    return row


def time_steps(rounds: int) -> dict[str, list[float]]:
    models = {kind: train_step.make_model() for kind in KINDS[:2]}
    opts = {kind: make_optimizer(kind, models[kind]) for kind in KINDS[:2]}
    times: dict[str, list[float]] = {kind: [] for kind in opts}
    for step in range(rounds + 3):
        for kind, opt in opts.items():
            train(models[kind], opt, step)
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            opt.zero_grad()
            if step >= 3:  # the first compiles, the next fill the allocator
                times[kind].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="timed steps per optimizer")
    parser.add_argument("--steps", type=int, default=8, help="steps per memory run")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(memory_child(args.child, args.steps)))
        return

    model = train_step.make_model()
    numel = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters()) / MB
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {numel / 1e6:.1f}M fp32")
    times = time_steps(args.rounds)
    fused = times["AdamW fused"]
    print("\nstep() ms, interleaved in one process")
    print("| optimizer | median | best | speed vs fused AdamW (median / best) |")
    print("|---|---:|---:|---:|")
    for kind, values in times.items():
        median, best = statistics.median(values), min(values)
        ratio = f"{statistics.median(fused) / median:.2f}x / {min(fused) / best:.2f}x"
        print(f"| {kind} | {median * 1e3:.1f} | {best * 1e3:.1f} | {ratio} |")

    rows = {}
    for kind in KINDS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--steps", str(args.steps)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows[kind] = json.loads(out.strip().splitlines()[-1])
    columns = list(rows[KINDS[0]])
    print(f"\nresident MB, fresh process each, {args.steps} steps")
    print("| optimizer | " + " | ".join(columns) + " | peak vs fused AdamW |")
    print("|---|" + "---:|" * (len(columns) + 1))
    for kind, row in rows.items():
        ratio = row["peak"] / rows["AdamW fused"]["peak"]
        print(f"| {kind} | " + " | ".join(f"{row[c]:.0f}" for c in columns) + f" | {ratio:.3f}x |")
    compiler = rows["shardadam compiled"]["peak"] - rows["shardadam eager"]["peak"]
    engine = rows["shardadam eager"]["peak"] - rows["AdamW fused"]["peak"]
    print(
        f"\nshardadam's extra peak: {compiler:.0f} MB kept by the compiler (compiled - eager), "
        f"{engine:.0f} MB in backward (eager - fused AdamW; the largest parameter's gradient, "
        f"its floor, is {largest:.0f} MB)"
    )


if __name__ == "__main__":
    main()
