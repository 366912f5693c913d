"""What the training app shows and writes on rank 0: the progress bar, ``metrics.jsonl``,
TensorBoard events and ``loss.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .bootstrap import DistributedContext
from .config import TrainConfig
from .optimizer import ShardedAdam


class Reporter:
    """What rank 0 shows and writes: the progress bar, metrics.jsonl, TensorBoard, loss.png."""

    def __init__(
        self, config: TrainConfig, output_dir: Path, ctx: DistributedContext, items_per_sample: int
    ) -> None:
        self.trainer, self.ctx, self.output_dir = config.trainer, ctx, output_dir
        self.items_per_step = config.trainer.batch_size * items_per_sample
        self.history: list[dict[str, Any]] = []
        self.bar = self.metrics = self.tensorboard = None
        self.state_bytes: list[int] = []

    def say(self, text: str) -> None:
        if not self.ctx.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def start(self, start: int, model: torch.nn.Module, optimizer: ShardedAdam) -> None:
        """Collective: gathers every rank's optimizer memory once (it does not change)."""
        mine = optimizer.memory_report()["optimizer_state"]
        self.state_bytes = [mine]
        if self.ctx.world_size > 1:
            self.state_bytes = [None] * self.ctx.world_size
            dist.all_gather_object(self.state_bytes, mine)
        if not self.ctx.is_main:
            return
        params = sum(p.numel() for p in model.parameters())
        self.say(
            f"ranks: {self.ctx.world_size}; parameters: {params:,}; optimizer state per rank: "
            f"{', '.join(f'{b:,}' for b in self.state_bytes)} bytes; output: {self.output_dir}"
        )
        self.metrics = open(self.output_dir / "metrics.jsonl", "a")  # noqa: SIM115
        if self.trainer.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))
        if self.trainer.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.trainer.steps, initial=start, desc="train", unit="step")

    def stepped(self, step: int, loss: float, optimizer: ShardedAdam, seconds: float) -> None:
        if not self.ctx.is_main:
            return
        lr = optimizer.param_groups[0]["lr"]
        norm = optimizer.last_grad_norm
        record = {
            "step": step,
            "loss": loss,
            "lr": float(lr),
            "grad_norm": None if norm is None else norm.item(),
            "step_time_s": seconds,
            "items_per_s": self.items_per_step / seconds,
            "optimizer_state_bytes_per_rank": self.state_bytes,
        }
        self._write(record)
        if self.bar is not None:
            self.bar.update(1)
            if step % self.trainer.log_every == 0:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{float(lr):.2e}", ms=seconds * 1e3)

    def evaluated(self, step: int, losses: dict[str, float], first: bool = False) -> None:
        if not self.ctx.is_main:
            return
        ema = f" (EMA weights: {losses['ema']:.4f})" if "ema" in losses else ""
        when = "before training" if first and step == 0 else f"at step {step}"
        self.say(f"held-out loss {when}: {losses['weights']:.4f}{ema}")
        self._write({"step": step, **{f"eval_loss_{k}": v for k, v in losses.items()}})

    def _write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.tensorboard is not None and record["step"] % self.trainer.log_every == 0:
            for key, value in record.items():
                if isinstance(value, float):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def finish(self) -> None:
        if not self.ctx.is_main:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for handle in (self.metrics, self.tensorboard):
            if handle is not None:
                handle.close()
        if self.trainer.plot:
            self.say(f"loss curve: {plot_losses(self.history, self.output_dir / 'loss.png')}")
        self.say(f"metrics: {self.output_dir / 'metrics.jsonl'}")


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path:
    """Training loss per step and held-out loss per evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history if "loss" in r]
    axes.plot(steps, [r["loss"] for r in history if "loss" in r], lw=0.8, label="training")
    for key, label in (("eval_loss_weights", "held-out"), ("eval_loss_ema", "held-out, EMA")):
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
