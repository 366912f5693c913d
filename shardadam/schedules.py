"""Keras's learning-rate schedules, with its argument names, defaults and float32 formulas.

A schedule is called with the optimizer's step counter (the number of ``step()`` calls so far,
counting every micro-step under gradient accumulation, as Keras does) and returns a 0-d float32
tensor. Each formula follows Keras 3 operation by operation, in float32, so that a ShardedAdam
driven by a schedule takes the same steps as a Keras optimizer driven by Keras's schedule.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import Tensor

_F32 = torch.float32


def _f32(value: Any) -> Tensor:
    return torch.as_tensor(value).detach().to(device="cpu", dtype=_F32)


def _check_decay_steps(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"Argument `{name}` must be > 0. Received: {name}={value}")


class LearningRateSchedule(abc.ABC):
    """Base class: a callable from the step counter to a learning rate.

    Subclasses set ``self._config`` to their constructor arguments and implement ``__call__``.
    """

    _config: dict[str, Any]

    @abc.abstractmethod
    def __call__(self, step: int | Tensor) -> Tensor:
        """The learning rate at ``step``, as a 0-d float32 tensor."""

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, so that ``type(s)(**s.get_config())`` rebuilds ``s``."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LearningRateSchedule:
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._config == other._config  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]


class ExponentialDecay(LearningRateSchedule):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)`` (floored when staircase)."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        decay_rate: float,
        staircase: bool = False,
        name: str = "ExponentialDecay",
    ) -> None:
        _check_decay_steps(decay_steps, "decay_steps")
        self._config = dict(
            initial_learning_rate=initial_learning_rate,
            decay_steps=decay_steps,
            decay_rate=decay_rate,
            staircase=staircase,
            name=name,
        )

    def __call__(self, step: int | Tensor) -> Tensor:
        c = self._config
        p = _f32(step) / _f32(c["decay_steps"])
        if c["staircase"]:
            p = torch.floor(p)
        return _f32(c["initial_learning_rate"]) * torch.pow(_f32(c["decay_rate"]), p)


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` up to ``boundaries[0]``, ``values[i]`` on (boundaries[i-1], boundaries[i]]."""

    def __init__(
        self, boundaries: list[float], values: list[float], name: str = "PiecewiseConstant"
    ) -> None:
        if len(boundaries) != len(values) - 1:
            raise ValueError(
                "The length of boundaries should be 1 less than the length of values. "
                f"Received: boundaries={boundaries} of length {len(boundaries)}, and "
                f"values={values} of length {len(values)}."
            )
        if any(b >= a for a, b in zip(boundaries[1:], boundaries[:-1])):
            raise ValueError(
                f"Invalid boundaries: {boundaries} (expected strictly increasing numbers)"
            )
        self._config = dict(boundaries=list(boundaries), values=list(values), name=name)

    def __call__(self, step: int | Tensor) -> Tensor:
        boundaries, values = self._config["boundaries"], self._config["values"]
        step_t = torch.as_tensor(step)
        # Keras sums indicator * value over the intervals; exactly one indicator is 1.
        result = (step_t <= boundaries[0]).to(_F32) * _f32(values[0])
        result = result + (step_t > boundaries[-1]).to(_F32) * _f32(values[-1])
        for low, high, value in zip(boundaries[:-1], boundaries[1:], values[1:-1]):
            in_range = ((step_t > low) & (step_t <= high)).to(_F32)
            result = result + in_range * _f32(value)
        return result


class PolynomialDecay(LearningRateSchedule):
    """Decay from ``initial_learning_rate`` to ``end_learning_rate`` over ``decay_steps``."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        end_learning_rate: float = 0.0001,
        power: float = 1.0,
        cycle: bool = False,
        name: str = "PolynomialDecay",
    ) -> None:
        _check_decay_steps(decay_steps, "decay_steps")
        self._config = dict(
            initial_learning_rate=initial_learning_rate,
            decay_steps=decay_steps,
            end_learning_rate=end_learning_rate,
            power=power,
            cycle=cycle,
            name=name,
        )

    def __call__(self, step: int | Tensor) -> Tensor:
        c = self._config
        initial = _f32(c["initial_learning_rate"])
        end = _f32(c["end_learning_rate"])
        global_step = _f32(step)
        decay_steps = _f32(c["decay_steps"])
        if c["cycle"]:
            multiplier = torch.where(
                global_step == 0, _f32(1.0), torch.ceil(global_step / c["decay_steps"])
            )
            decay_steps = decay_steps * multiplier
        else:
            global_step = torch.minimum(global_step, decay_steps)
        p = global_step / decay_steps
        return (initial - end) * torch.pow(1 - p, _f32(c["power"])) + end


class InverseTimeDecay(LearningRateSchedule):
    """``initial_learning_rate / (1 + decay_rate * step / decay_steps)``, floored if staircase."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        decay_rate: float,
        staircase: bool = False,
        name: str = "InverseTimeDecay",
    ) -> None:
        _check_decay_steps(decay_steps, "decay_steps")
        self._config = dict(
            initial_learning_rate=initial_learning_rate,
            decay_steps=decay_steps,
            decay_rate=decay_rate,
            staircase=staircase,
            name=name,
        )

    def __call__(self, step: int | Tensor) -> Tensor:
        c = self._config
        p = _f32(step) / _f32(c["decay_steps"])
        if c["staircase"]:
            p = torch.floor(p)
        return _f32(c["initial_learning_rate"]) / (_f32(1) + _f32(c["decay_rate"]) * p)


class CosineDecay(LearningRateSchedule):
    """Optional linear warmup to ``warmup_target``, then cosine decay to ``alpha`` times it."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        alpha: float = 0.0,
        name: str = "CosineDecay",
        warmup_target: float | None = None,
        warmup_steps: int = 0,
    ) -> None:
        _check_decay_steps(decay_steps, "decay_steps")
        if warmup_target is not None and (
            isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0
        ):
            raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (expected an integer >= 0)")
        self._config = dict(
            initial_learning_rate=initial_learning_rate,
            decay_steps=decay_steps,
            alpha=alpha,
            name=name,
            warmup_target=warmup_target,
            warmup_steps=warmup_steps,
        )

    def _decay(self, step: Tensor, decay_steps: Tensor, decay_from_lr: Tensor) -> Tensor:
        alpha = self._config["alpha"]
        completed_fraction = step / decay_steps
        cosine_decayed = 0.5 * (1.0 + torch.cos(_f32(math.pi) * completed_fraction))
        decayed = (1 - alpha) * cosine_decayed + alpha
        return decay_from_lr * decayed

    def __call__(self, step: int | Tensor) -> Tensor:
        c = self._config
        initial = _f32(c["initial_learning_rate"])
        decay_steps = _f32(c["decay_steps"])
        global_step = _f32(step)
        if c["warmup_target"] is None:
            return self._decay(torch.minimum(global_step, decay_steps), decay_steps, initial)
        target = _f32(c["warmup_target"])
        warmup_steps = _f32(c["warmup_steps"])
        global_step = torch.minimum(global_step, decay_steps + warmup_steps)
        if global_step < warmup_steps:
            return (target - initial) * (global_step / warmup_steps) + initial
        return self._decay(global_step - warmup_steps, decay_steps, target)


class CosineDecayRestarts(LearningRateSchedule):
    """Cosine decay with warm restarts (SGDR): periods grow by ``t_mul``, peaks by ``m_mul``."""

    def __init__(
        self,
        initial_learning_rate: float,
        first_decay_steps: int,
        t_mul: float = 2.0,
        m_mul: float = 1.0,
        alpha: float = 0.0,
        name: str = "SGDRDecay",
    ) -> None:
        _check_decay_steps(first_decay_steps, "first_decay_steps")
        self._config = dict(
            initial_learning_rate=initial_learning_rate,
            first_decay_steps=first_decay_steps,
            t_mul=t_mul,
            m_mul=m_mul,
            alpha=alpha,
            name=name,
        )

    def __call__(self, step: int | Tensor) -> Tensor:
        c = self._config
        initial = _f32(c["initial_learning_rate"])
        alpha = _f32(c["alpha"])
        t_mul = _f32(c["t_mul"])
        m_mul = _f32(c["m_mul"])
        completed_fraction = _f32(step) / _f32(c["first_decay_steps"])
        if t_mul == 1.0:
            i_restart = torch.floor(completed_fraction)
            completed_fraction = completed_fraction - i_restart
        else:
            i_restart = torch.floor(
                torch.log(1.0 - completed_fraction * (1.0 - t_mul)) / torch.log(t_mul)
            )
            sum_r = (1.0 - torch.pow(t_mul, i_restart)) / (1.0 - t_mul)
            completed_fraction = (completed_fraction - sum_r) / torch.pow(t_mul, i_restart)
        m_fac = torch.pow(m_mul, i_restart)
        cosine_decayed = 0.5 * m_fac * (1.0 + torch.cos(_f32(math.pi) * completed_fraction))
        decayed = (1 - alpha) * cosine_decayed + alpha
        return initial * decayed


__all__ = [
    "CosineDecay",
    "CosineDecayRestarts",
    "ExponentialDecay",
    "InverseTimeDecay",
    "LearningRateSchedule",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
]
