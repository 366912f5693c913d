"""What a resumed run of the training app takes from its checkpoint, and what from its config.

Note [the resume rule]
    The checkpoint gives the run's *state*: the weights, the optimizer's moments, EMA and
    masters, its step counters (so a schedule continues where it was), the RNG states and, from
    the step, the position in the data. The config gives every *setting*: the learning rate
    and its schedule, betas, epsilon, weight decay and its exclusions, clipping, the EMA
    momentum. That is what users expect of `trainer.resume=... optimizer.learning_rate=1e-4`
    and what `.hydra/config.yaml` records, so the run's config says what the run used.
    Every setting that differs from the checkpoint's is logged (and written to resumed.json).
    Settings that decide which state exists (use_ema, amsgrad, gradient accumulation) cannot
    change on resume: that is an error naming the setting.

The checkpoint holds the config it was trained with (``extra["config"]``); ShardedAdam's
``load_state_dict`` follows torch's convention (the saved hyperparameters win), so the app
puts the configured ones back after loading.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch

from .app_config import RESUME_AUTO, TrainConfig, TrainerConfig
from .optimizers import ShardedAdam

# Settings that decide which state the optimizer keeps: the checkpoint's state fits only them.
STATE_SETTINGS = ("optimizer.use_ema", "optimizer.amsgrad", "optimizer.gradient_accumulation_steps")
# Trainer settings that say how this run goes and what it writes, not what it trains: a
# resumed run is free to change them without a word.
_RUN_ONLY = (
    "resume", "progress", "tensorboard", "plot", "threads", "log_every", "eval_every",
    "eval_samples", "checkpoint_every", "checkpoint_dir", "keep_last",
)  # fmt: skip


def resume_source(trainer: TrainerConfig, checkpoint_dir: Path) -> tuple[Path, bool] | None:
    """Where this run resumes from and whether a checkpoint must be there; None: afresh."""
    if trainer.resume is None:
        return None
    if trainer.resume == RESUME_AUTO:
        return checkpoint_dir, False
    return Path(trainer.resume).expanduser(), True


def config_record(config: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint records (JSON values): what a resumed run compares with."""
    record = dataclasses.asdict(config)
    record["trainer"] = {k: v for k, v in record["trainer"].items() if k not in _RUN_ONLY}
    return record


def differences(saved: Any, now: Any, where: str = "") -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (checkpoint's value, config's value)}`` for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(now, dict):
        found = {}
        for key in sorted(set(saved) | set(now), key=str):
            found.update(differences(saved.get(key), now.get(key), f"{where}{key}."))
        return found
    if isinstance(saved, (list, tuple)) and isinstance(now, (list, tuple)):
        saved, now = list(saved), list(now)
    return {} if saved == now else {where.rstrip("."): (saved, now)}


def check_state_settings(changed: dict[str, tuple[Any, Any]]) -> None:
    for key in STATE_SETTINGS:
        if key in changed:
            saved, now = changed[key]
            raise ValueError(
                f"Invalid {key}: {now!r} on resume, but the checkpoint was trained with "
                f"{saved!r}; it decides which optimizer state exists, so it cannot change "
                f"when resuming (set {key}={_yaml(saved)}, or start afresh)"
            )


def _yaml(value: Any) -> str:
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


class ConfiguredHyperparameters:
    """The optimizer's settings as the config made them, to put back after a load
    (Note [the resume rule])."""

    def __init__(self, optimizer: ShardedAdam, exclude_from_weight_decay: list[str]) -> None:
        self.groups = [
            {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]
        self.exclude_from_weight_decay = list(exclude_from_weight_decay)

    def restore(self, optimizer: ShardedAdam) -> None:
        for group, configured in zip(optimizer.param_groups, self.groups):
            for key, value in configured.items():
                if key == "lr" and isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(float(value))
                else:
                    group[key] = value
        optimizer.exclude_from_weight_decay(var_names=self.exclude_from_weight_decay or None)


# ---------------------------------------------------------------------- RNG states


def rng_states(device: torch.device) -> dict[str, Any]:
    """This process's random number generators, for ``extra`` (a resumed run draws on)."""
    import numpy

    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": numpy.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(extra: dict[str, Any], device: torch.device) -> bool:
    """Set the generators a checkpoint's ``extra`` holds (``rng_states``); False if it holds
    none (a checkpoint saved outside the app): they then go on from this run's seed."""
    import numpy

    states = extra.get("rng")
    if states is None and isinstance(extra.get("rng_state"), torch.Tensor):
        states = {"torch": extra["rng_state"]}  # the app's checkpoints before numpy's, Python's
    if states is None:
        return False
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        numpy.random.set_state(states["numpy"])
    if "python" in states:
        random.setstate(states["python"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    return True
