"""The training app: ``python -m shardadam.train [overrides]`` (or ``shardadam-train``).

Hydra composes ``shardadam/configs/config.yaml`` over the schema in ``shardadam.config`` (so a
typo'd key or a wrong type fails before anything starts), then every rank builds the model and
data named by their ``_target_``, trains with ShardedAdam and evaluates on the held-out split
(with the EMA weights too where ``optimizer.use_ema``). Rank 0 writes into the run's output
directory: the config (``.hydra/``), ``metrics.jsonl`` (one line per step and per evaluation),
``loss.png``, TensorBoard events if asked, and the checkpoints (every rank writes its part).

Ranks come from torchrun, MPI or Slurm (``shardadam.bootstrap``); see ``launch/``. This is the
only module that imports Hydra: the rest of shardadam takes plain dataclasses.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import checkpoint
from .bootstrap import DistributedContext, distributed_from_env
from .config import TrainConfig
from .datasets import LOSSES
from .optimizer import ShardedAdam
from .reporting import Reporter
from .startup import check_writable, decide_resume, shared_output_dir

# Inside the package, so that an installed wheel has them (package data, see pyproject.toml).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

ConfigStore.instance().store(name="schema", node=TrainConfig)
# For schedule configs sized from trainer.steps (configs/optimizer/schedule/).
OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b), replace=True)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra's entry point: the composed config as dataclasses, then ``train``."""
    config = OmegaConf.to_object(cfg)
    return train(config, Path(HydraConfig.get().runtime.output_dir))


def train(config: TrainConfig, output_dir: Path) -> float:
    """Train on every rank; returns the final held-out loss (of the EMA weights if kept)."""
    distributed = config.distributed
    with distributed_from_env(
        backend=distributed.backend,
        expected_world_size=distributed.world_size,
        timeout_s=distributed.timeout_s,
    ) as ctx:
        _set_threads(config.trainer.threads, ctx)
        output_dir = shared_output_dir(output_dir, ctx, config.trainer.checkpoint_dir)
        return _Run(config, output_dir, ctx).train()


class _Run:
    """One training run on one rank: model, data, optimizer, and what it reports."""

    def __init__(self, config: TrainConfig, output_dir: Path, ctx: DistributedContext) -> None:
        self.config, self.trainer, self.ctx = config, config.trainer, ctx
        self.output_dir = output_dir
        if self.trainer.batch_size % ctx.world_size:
            raise ValueError(
                f"Invalid trainer.batch_size: {self.trainer.batch_size} does not split evenly "
                f"over {ctx.world_size} ranks (use a multiple of {ctx.world_size})"
            )
        if self.trainer.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ModuleNotFoundError(
                "trainer.tensorboard=true needs the tensorboard package: pip install "
                "tensorboard, or set trainer.tensorboard=false"
            )
        torch.manual_seed(self.trainer.seed)  # the same initial model on every rank
        self.model = _instantiate(config.model, "model", torch.nn.Module).to(ctx.device)
        self.data = _instantiate(config.data, "data", object)
        _check_splits(self.data)
        if len(self.data.train) < self.trainer.batch_size:
            raise ValueError(
                f"Invalid trainer.batch_size: {self.trainer.batch_size} is more than the "
                f"{len(self.data.train)} samples of the training split"
            )
        self.optimizer = _build_optimizer(config, self.model)
        _check_same_weights(self.model, ctx)
        self.checkpoint_dir = output_dir / self.trainer.checkpoint_dir
        self.reporter = Reporter(config, output_dir, ctx, self.data.items_per_sample)
        self._epoch_order: tuple[int, torch.Tensor | None] = (-1, None)

    def train(self) -> float:
        trainer, ctx = self.trainer, self.ctx
        start = self._resume() if trainer.resume else 0
        self.reporter.start(start, self.model, self.optimizer)
        losses = self.evaluate()
        self.reporter.evaluated(start, losses, first=True)
        self.model.train()
        for step in range(start + 1, trainer.steps + 1):
            began = time.perf_counter()
            loss = self._train_step(step)
            loss = _global_mean(loss.detach(), ctx)
            self.reporter.stepped(step, loss, self.optimizer, time.perf_counter() - began)
            if step == trainer.steps or (trainer.eval_every and step % trainer.eval_every == 0):
                losses = self.evaluate()
                self.reporter.evaluated(step, losses)
            if step == trainer.steps or (
                trainer.checkpoint_every and step % trainer.checkpoint_every == 0
            ):
                self._save(step)
        self.reporter.finish()
        return losses.get("ema", losses["weights"])

    def _train_step(self, step: int) -> torch.Tensor:
        inputs, targets = self._batch(step)
        loss = _loss(self.data.loss, self.model(inputs), targets) / targets.numel()
        self.optimizer.scale_loss(loss).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of step ``step``'s global batch: samples drawn without replacement
        from a permutation per epoch, a function of (seed, step) only (so a resumed run sees
        the batches the uninterrupted one would)."""
        train, size = self.data.train, self.trainer.batch_size
        per_epoch = max(1, len(train) // size)
        epoch, index = divmod(step - 1, per_epoch)
        if self._epoch_order[0] != epoch:  # one permutation per epoch, not per step
            seed = self.trainer.seed * 100003 + epoch
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
            self._epoch_order = (epoch, order)
        global_batch = self._epoch_order[1][index * size : (index + 1) * size]
        per_rank = size // self.ctx.world_size
        mine = global_batch[self.ctx.rank * per_rank : (self.ctx.rank + 1) * per_rank]
        return _stack(train, mine.tolist(), self.ctx.device)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Collective: mean held-out loss of the weights, and of their EMA if kept."""
        losses = {"weights": self._held_out_loss()}
        if self.config.optimizer.use_ema and self.optimizer.iterations > 0:
            with self.optimizer.swap_moving_averages():
                losses["ema"] = self._held_out_loss()
        return losses

    def _held_out_loss(self) -> float:
        self.model.eval()
        split = self.data.eval
        count = min(self.trainer.eval_samples, len(split))
        mine = list(range(self.ctx.rank, count, self.ctx.world_size))
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        batch = max(1, self.trainer.batch_size // self.ctx.world_size)
        for first in range(0, len(mine), batch):
            inputs, targets = _stack(split, mine[first : first + batch], self.ctx.device)
            total[0] += _loss(self.data.loss, self.model(inputs), targets).double()
            total[1] += targets.numel()
        if self.ctx.world_size > 1:
            dist.all_reduce(total)
        self.model.train()
        return (total[0] / total[1]).item()

    def _resume(self) -> int:
        """Collective: load the checkpoint rank 0 chose; the step to continue after."""
        path = decide_resume(self.checkpoint_dir, self.ctx)
        if path is None:
            self.reporter.say(f"no checkpoint in {self.checkpoint_dir}: starting from step 0")
            return 0
        info = checkpoint.load(path, model=self.model, optimizer=self.optimizer)
        torch.set_rng_state(info.extra["rng_state"])
        self.reporter.say(f"resumed from {info.path} (saved on {info.world_size} ranks)")
        return info.step

    def _save(self, step: int) -> None:
        checkpoint.save(
            self.checkpoint_dir,
            model=self.model,
            optimizer=self.optimizer,
            step=step,
            extra={"rng_state": torch.get_rng_state()},
            keep_last=self.trainer.keep_last,
        )


# ---------------------------------------------------------------------- building blocks


def _instantiate(spec: dict[str, Any], name: str, kind: type) -> Any:
    built = hydra.utils.instantiate(spec, _convert_="all")
    if not isinstance(built, kind):
        raise TypeError(
            f"{name}._target_={spec['_target_']!r} built a {type(built).__name__}; expected "
            f"{'an nn.Module' if kind is torch.nn.Module else 'an object'}"
        )
    return built


def _check_splits(data: Any) -> None:
    missing = [a for a in ("train", "eval", "loss", "items_per_sample") if not hasattr(data, a)]
    if missing:
        raise TypeError(
            f"data._target_ built a {type(data).__name__} without {missing}; a data factory "
            "returns shardadam.datasets.Splits (train, eval, loss, items_per_sample)"
        )
    if data.loss not in LOSSES:
        raise ValueError(f"Invalid loss of the data: {data.loss!r} (expected one of {LOSSES})")
    if len(data.train) == 0 or len(data.eval) == 0:
        raise ValueError("the data's train and eval splits must not be empty")


def _build_optimizer(config: TrainConfig, model: torch.nn.Module) -> ShardedAdam:
    settings = config.optimizer
    arguments = settings.keras_arguments()
    if settings.schedule is not None:
        arguments["learning_rate"] = hydra.utils.instantiate(settings.schedule, _convert_="all")
    optimizer = ShardedAdam(
        model.named_parameters(), **arguments, **config.distributed.sharding_options()
    )
    if settings.exclude_from_weight_decay:
        optimizer.exclude_from_weight_decay(var_names=settings.exclude_from_weight_decay)
    return optimizer


def _check_same_weights(model: torch.nn.Module, ctx: DistributedContext) -> None:
    """Collective: every rank must start from rank 0's weights (ShardedAdam has already
    checked names and shapes)."""
    if ctx.world_size == 1:
        return
    with torch.no_grad():
        total = sum(t.double().sum() for t in model.state_dict().values() if t.is_floating_point())
        mine = torch.as_tensor(total, dtype=torch.float64, device=ctx.device).reshape(1)
    everyone = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    differing = [r for r, t in enumerate(everyone) if not torch.equal(t, everyone[0])]
    if differing:
        raise RuntimeError(
            f"rank {ctx.rank}/{ctx.world_size}: the model's initial weights differ between "
            f"rank 0 and ranks {differing}; build the model deterministically (the app seeds "
            "torch with trainer.seed just before building it)"
        )


def _set_threads(threads: int | None, ctx: DistributedContext) -> None:
    if threads is None and ctx.world_size > 1 and ctx.device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // ctx.world_size)
    if threads is not None:
        torch.set_num_threads(threads)


class CheckOutputDir(Callback):
    """Hydra callback (configs/config.yaml): refuse an output directory that cannot be
    written, with what to change, before Hydra tries to make it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._exit_unless_writable(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._exit_unless_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")

    @staticmethod
    def _exit_unless_writable(directory: Path, setting: str) -> None:
        try:
            check_writable(directory, setting)
        except PermissionError as error:
            # Hydra turns a callback's exceptions into warnings and goes on; stop here.
            print(f"Error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None


def _stack(split: Any, indices: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    items = [split[i] for i in indices]
    return tuple(torch.stack(column).to(device) for column in zip(*items))


def _loss(kind: str, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed over the batch's items (tokens for a language model)."""
    if kind == "cross_entropy":
        return torch.nn.functional.cross_entropy(
            output.flatten(0, -2).float(), targets.flatten(), reduction="sum"
        )
    return torch.nn.functional.mse_loss(output.float(), targets.float(), reduction="sum")


def _global_mean(value: torch.Tensor, ctx: DistributedContext) -> float:
    if ctx.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= ctx.world_size
    return value.item()


if __name__ == "__main__":
    main()
