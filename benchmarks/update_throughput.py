"""Per-shard update throughput: ShardedAdam's kernel against torch's AdamW on one process.

    python benchmarks/update_throughput.py [--numel 16000000] [--rounds 5]

Times, interleaved round by round (the machine is noisy), for one flat fp32 parameter:
  - shardadam kernel (compiled and eager): the per-shard update (adam_shard_step_), each run
    preceded by a copy of a fresh gradient, which the "grad refresh" row times alone;
  - shardadam step(): the whole optimizer step (gradient copy, global norm, update);
  - torch AdamW fused / foreach: optimizer.step().
Prints the median time per step and each one's element throughput relative to fused AdamW,
measured in the same run. A fixed CPU probe (a 2048x2048 matmul) runs beside each round to show
how fast the machine was at the time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from shardadam import ShardedAdam
from shardadam.kernels import UpdateRunner
from shardadam.rules.adam import adam_shard_step_, adam_shard_step_inplace_, update_scalars


def probe_s() -> float:
    a = torch.randn(2048, 2048)
    start = time.perf_counter()
    a @ a
    return time.perf_counter() - start


def make_kernel_case(numel: int, jit: bool | None):
    """The per-shard update alone; ``jit=None`` times only the gradient refresh it includes.

    The eager kernel uses the gradient as scratch space, so every run first copies a fresh
    gradient in; the "grad refresh" row measures that copy alone.
    """
    runner = UpdateRunner(jit_compile=bool(jit))
    param, fresh_grad, grad = torch.randn(numel), torch.randn(numel), torch.empty(numel)
    exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel)
    scalars = update_scalars(1e-3, 0.9, 0.999, 1e-7, 0.01, step=1)
    state = (exp_avg, exp_avg_sq, None, None, None, None, None, scalars)

    def run():
        grad.copy_(fresh_grad)
        if jit is not None:
            runner(adam_shard_step_, adam_shard_step_inplace_, param, grad, *state)

    return run


def make_optimizer_case(numel: int, which: str):
    param = torch.nn.Parameter(torch.randn(numel))
    if which == "shardadam step()":
        opt = ShardedAdam([param], learning_rate=1e-3, weight_decay=0.01)
    elif which == "torch AdamW fused":
        opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, fused=True)
    else:
        opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, foreach=True)
    grad = torch.randn(numel)

    def run():
        param.grad = grad
        opt.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=16_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    args = parser.parse_args()

    cases = {
        "grad refresh (copy) alone": make_kernel_case(args.numel, jit=None),
        "shardadam kernel (compiled)": make_kernel_case(args.numel, jit=True),
        "shardadam kernel (eager)": make_kernel_case(args.numel, jit=False),
        "shardadam step()": make_optimizer_case(args.numel, "shardadam step()"),
        "torch AdamW fused": make_optimizer_case(args.numel, "torch AdamW fused"),
        "torch AdamW foreach": make_optimizer_case(args.numel, "torch AdamW foreach"),
    }
    for run in cases.values():  # warm up: compile, allocate
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    probes = []
    for _ in range(args.rounds):
        probes.append(probe_s())
        for name, run in cases.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[name].append((time.perf_counter() - start) / args.steps)
    reference = statistics.median(times["torch AdamW fused"])
    refresh = statistics.median(times["grad refresh (copy) alone"])
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.numel:,} fp32 elements")
    print(f"CPU probe (2048^2 matmul): median {statistics.median(probes) * 1e3:.1f} ms")
    print(f"| {'implementation':<28} | median ms/step | best ms/step | throughput vs fused AdamW |")
    print(f"|{'-' * 30}|---------------:|-------------:|--------------------------:|")
    for name, samples in times.items():
        median = statistics.median(samples)
        ratio = f"{reference / median:.2f}x"
        if name.startswith("shardadam kernel"):
            ratio += f" ({reference / (median - refresh):.2f}x net of refresh)"
        print(f"| {name:<28} | {median * 1e3:14.2f} | {min(samples) * 1e3:12.2f} | {ratio:>25} |")


if __name__ == "__main__":
    main()
