"""A small training run with ShardedAdam: ``python -m shardadam.toy``, or across ranks
``torchrun --standalone --nproc_per_node=2 -m shardadam.toy`` (each rank draws its own batches;
the optimizer averages their gradients and shards its state).

Fits a two-layer MLP to a fixed random teacher network on synthetic data, with a cosine
schedule with warmup, decoupled weight decay excluded from biases, global-norm clipping and an
EMA of the weights, and prints the training loss falling and the held-out loss of the EMA.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from . import ShardedAdam, schedules
from .bootstrap import DistributedContext, distributed_from_env


def make_data(seed: int, n_train: int = 2048, n_test: int = 512, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        x = torch.randn(n_train + n_test, dim, generator=gen)
        y = teacher(x) + 0.05 * torch.randn(n_train + n_test, 1, generator=gen)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-jit", action="store_true", help="run the update eagerly (jit_compile=False)"
    )
    args = parser.parse_args(argv)
    with distributed_from_env() as ctx:
        return train(args, ctx)


def train(args: argparse.Namespace, ctx: DistributedContext) -> float:
    """Train; returns the held-out loss of the EMA weights."""

    def say(text: str) -> None:
        if ctx.is_main:
            print(text, flush=True)

    torch.manual_seed(args.seed)  # the same initial model on every rank
    (x, y), (x_test, y_test) = make_data(args.seed)
    x, y, x_test, y_test = (t.to(ctx.device) for t in (x, y, x_test, y_test))
    model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.GELU(), nn.Linear(64, 1)).to(ctx.device)
    schedule = schedules.CosineDecay(
        0.0,
        decay_steps=args.steps - args.steps // 10,
        alpha=0.05,
        warmup_target=args.learning_rate,
        warmup_steps=args.steps // 10,
    )
    opt = ShardedAdam(
        model.named_parameters(),
        learning_rate=schedule,
        weight_decay=1e-3,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.98,
        jit_compile=not args.no_jit,
    )
    opt.exclude_from_weight_decay(var_names=["bias"])
    batches = torch.Generator().manual_seed(args.seed + 1 + ctx.rank)  # each rank its own data

    def test_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(x_test), y_test).item()

    say(f"ranks: {ctx.world_size}; held-out loss before training: {test_loss():.4f}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=batches).to(ctx.device)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 50 == 0 or step == args.steps:
            say(
                f"step {step:4d}  loss {loss.item():.4f}  lr {opt.param_groups[0]['lr']:.5f}  "
                f"grad norm {opt.last_grad_norm.item():.3f}  "
                f"{time.perf_counter() - start:.1f}s"
            )
    with opt.swap_moving_averages():
        ema_test_loss = test_loss()
    say(f"held-out loss after training: {test_loss():.4f} (EMA weights: {ema_test_loss:.4f})")
    say(f"optimizer state on each rank: {opt.memory_report()['optimizer_state']:,} bytes")
    return ema_test_loss


if __name__ == "__main__":
    main()
