"""What the training app shows and writes on rank 0: the progress bar, its messages (on the
console and in Hydra's ``train.log``), ``metrics.jsonl``, TensorBoard events and ``loss.png``."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .app_config import TrainConfig
from .bootstrap import DistributedContext
from .optimizers import ShardedAdam

LOGGER = logging.getLogger("shardadam.train")
"""The app's messages. On rank 0: the console once (above the progress bar) and the root
logger's log files (Hydra's ``train.log``); on other ranks: warnings and errors, on stderr."""


class Reporter:
    """What rank 0 shows and writes: the progress bar, metrics.jsonl, TensorBoard, loss.png.

    Messages go through ``LOGGER`` (Note [one train.log]). ``metrics.jsonl`` holds one record
    per step and per evaluation, each step once: a run that starts from step S in a directory
    that already has the file keeps the records before S (and step S's training record) and
    drops the rest, which this run redoes (Note [resuming into the same directory]).
    """

    def __init__(
        self, config: TrainConfig, output_dir: Path, ctx: DistributedContext, items_per_sample: int
    ) -> None:
        self.trainer, self.ctx, self.output_dir = config.trainer, ctx, output_dir
        self.items_per_step = config.trainer.batch_size * items_per_sample
        self.history: list[dict[str, Any]] = []
        self.bar = self.metrics = self.tensorboard = None
        self.state_bytes: list[int] = []
        route_logging(ctx, self)

    def say(self, text: str) -> None:
        if self.ctx.is_main:
            LOGGER.info(text)

    def start(self, start: int, model: torch.nn.Module, optimizer: ShardedAdam) -> None:
        """Collective: gathers every rank's optimizer memory once (it does not change).

        ``start`` is the step the run continues after (0: afresh)."""
        mine = optimizer.memory_report()["optimizer_state"]
        self.state_bytes = [mine]
        if self.ctx.world_size > 1:
            self.state_bytes = [None] * self.ctx.world_size
            dist.all_gather_object(self.state_bytes, mine)
        if not self.ctx.is_main:
            return
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # "parameters: N;" first: scripts and tests read the total from it.
        self.say(
            f"ranks: {self.ctx.world_size}; parameters: {total:,}; trainable: {trainable:,}; "
            f"optimizer state per rank: {', '.join(f'{b:,}' for b in self.state_bytes)} bytes; "
            f"output: {self.output_dir}"
        )
        self.history = keep_records_before(self.output_dir / "metrics.jsonl", start)
        self.metrics = open(self.output_dir / "metrics.jsonl", "a")  # noqa: SIM115
        if self.trainer.tensorboard:
            self._open_tensorboard(start)
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

    def _open_tensorboard(self, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        directory = self.output_dir / "tensorboard"
        # Note [resuming into the same directory]: purge_step hides the earlier run's events
        # from step `start` on; step start's training scalars, kept, are written again.
        purge_step = start if directory.exists() else None
        self.tensorboard = SummaryWriter(str(directory), purge_step=purge_step)
        if purge_step is not None:
            for record in self.history:
                if record["step"] == start:
                    self._write_scalars(record)

    def _write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        self._write_scalars(record)

    def _write_scalars(self, record: dict[str, Any]) -> None:
        """TensorBoard: every evaluation; training scalars every ``log_every`` steps."""
        if self.tensorboard is None:
            return
        if is_training_record(record) and record["step"] % self.trainer.log_every:
            return
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


def is_training_record(record: dict[str, Any]) -> bool:
    """A step's record (``stepped``), not an evaluation's (``evaluated``)."""
    return "loss" in record


# Note [resuming into the same directory]
# A requeued job (trainer.resume=auto) continues from its own latest checkpoint, at step S,
# writing into the same run directory: its metrics.jsonl may hold steps past S, logged before
# the job was killed, which the resumed run does again, and the evaluation at S, which the
# resumed run does again first thing. Keeping the records before S and step S's training
# record makes the file hold each step once, as if the run had never stopped. The same rule
# covers a run from step 0 in a directory used before: it drops everything.


def keep_records_before(path: Path, start: int) -> list[dict[str, Any]]:
    """The records of ``path`` (a metrics.jsonl) that a run continuing after step ``start``
    does not write again, in their order; rewrites the file to hold just them, atomically (a
    temporary file renamed over it), where that drops anything. A missing file: none.

    A line that does not parse (the last one, cut short by a killed job) is dropped too."""
    if not path.exists():
        return []
    kept, dropped = [], False
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, TypeError, KeyError):
            dropped = True
            continue
        if step < start or (step == start and is_training_record(record)):
            kept.append(record)
        else:
            dropped = True
    if dropped:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temporary, "w") as file:
            file.writelines(json.dumps(record) + "\n" for record in kept)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    return kept


# Note [one train.log]
# Hydra's job logging gives the root logger a console handler and a file handler on
# train.log, on every rank (all ranks run Hydra, all open the same train.log). The app's
# messages (LOGGER) do not propagate to the root: on rank 0 they go to the console through
# their own handler (the bare text, above the progress bar while it is open, so the bar stays
# whole and nothing is printed twice) and to the root's file handlers. Other ranks drop the
# root's file handlers, so that only rank 0 writes train.log; their LOGGER shows warnings and
# errors on stderr, with the rank.


class _Console(logging.Handler):
    """Rank 0's console: the message alone, through tqdm while the reporter's bar is open;
    warnings and errors on stderr."""

    def __init__(self, reporter: Reporter) -> None:
        super().__init__()
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            if self.reporter.bar is not None:
                self.reporter.bar.write(text, file=stream)
            else:
                print(text, file=stream, flush=True)
        except Exception:
            self.handleError(record)


def route_logging(ctx: DistributedContext, reporter: Reporter) -> None:
    """Point ``LOGGER`` at this rank's outputs (Note [one train.log]); replaces what an earlier
    call set up."""
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    # The package's own logger too (the optimizer says when its first update compiles).
    loggers = (LOGGER, logging.getLogger("shardadam"))
    if ctx.is_main:
        handlers: list[logging.Handler] = [_Console(reporter), *files]
        level = logging.INFO
    else:
        for handler in files:
            root.removeHandler(handler)
            handler.close()
        errors = logging.StreamHandler(sys.stderr)
        errors.setFormatter(
            logging.Formatter(f"rank {ctx.rank}/{ctx.world_size}: %(levelname)s: %(message)s")
        )
        handlers, level = [errors], logging.WARNING
    for logger in loggers:
        logger.propagate = False
        logger.setLevel(level)
        logger.handlers = list(handlers)


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
