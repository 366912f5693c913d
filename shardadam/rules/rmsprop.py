"""RMSprop as Keras 3 computes it on the torch backend (see ``shardadam.rules`` for the contract).

Per step, on the decayed weights w and the processed gradient g:
    v <- rho * v + (1 - rho) * g^2
    a <- rho * a + (1 - rho) * g                    (centered)
    d <- sqrt(v + epsilon), or sqrt(v + epsilon - a^2) when centered
    s <- (g * lr) / d
    m <- momentum * m + s;  w <- w - m              (momentum > 0)
    w <- w - s                                      (momentum == 0)
Where torch.optim.RMSprop differs: Keras adds epsilon inside the square root (torch: sqrt(v) +
eps); Keras's momentum buffer accumulates steps that already include the learning rate (torch's
holds g / d and multiplies by lr afterwards, so a schedule acts on it at once); torch calls rho
``alpha``, and its defaults differ (lr 0.01, alpha 0.99, eps 1e-8 against 0.001, 0.9, 1e-7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import check_bool, check_number_range

NAME = "RMSprop"
LEARNING_RATE = 0.001
HYPERPARAMETERS: dict[str, Any] = {"rho": 0.9, "momentum": 0.0, "epsilon": 1e-7, "centered": False}

GROUP_KEYS = {"rho": ("alpha", None), "epsilon": ("eps", None)}
"""Where torch.optim.RMSprop keeps these in a param group (``momentum`` and ``centered`` keep
their names there)."""


class RMSpropScalars(NamedTuple):
    learning_rate: Tensor
    rho: Tensor
    one_minus_rho: Tensor
    momentum: Tensor
    epsilon: Tensor


def check(hp: Mapping[str, Any], where: str = "") -> None:
    # Keras checks none of these. We refuse a rho or momentum outside [0, 1], which is no decay
    # rate (a negative momentum would silently mean none: Keras only keeps one when > 0, and one
    # above 1 makes the steps grow without bound); and epsilon = 0, which Keras accepts: an
    # element whose gradients have all been 0 then divides 0 by 0 (NaN).
    check_number_range(hp["rho"], f"rho{where}", low=0.0, high=1.0)
    check_number_range(hp["momentum"], f"momentum{where}", low=0.0, high=1.0)
    check_number_range(hp["epsilon"], f"epsilon{where}", low=0.0, low_open=True)
    check_bool(hp["centered"], f"centered{where}")


def slots(hp: Mapping[str, Any]) -> dict[str, float]:
    named = {"velocity": 0.0}
    if hp["momentum"] > 0:
        named["momentum"] = 0.0
    if hp["centered"]:
        named["average_gradient"] = 0.0
    return named


def static(hp: Mapping[str, Any]) -> tuple:
    return (hp["momentum"] > 0, bool(hp["centered"]))


def scalars(hp: Mapping[str, Any], learning_rate: Tensor, step: int, dtype: torch.dtype) -> Tensor:
    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype, device=learning_rate.device)  # from the double

    rho = float(hp["rho"])
    return torch.stack(
        RMSpropScalars(
            learning_rate=learning_rate,
            rho=scalar(rho),
            one_minus_rho=scalar(1.0 - rho),
            momentum=scalar(float(hp["momentum"])),
            epsilon=scalar(float(hp["epsilon"])),
        )
    )


def update(
    weights: Tensor, grad: Tensor, slots: tuple[Tensor, ...], scalars: Tensor, static: tuple
) -> tuple[Tensor, tuple[Tensor, ...]]:
    has_momentum, centered = static
    s = RMSpropScalars(*scalars.unbind(0))
    velocity = slots[0] * s.rho + (grad * grad) * s.one_minus_rho
    new_slots = [velocity]
    denom = velocity + s.epsilon
    if centered:
        average_grad = slots[-1] * s.rho + grad * s.one_minus_rho
        denom = denom - average_grad * average_grad
    step = (grad * s.learning_rate) / torch.sqrt(denom)
    if has_momentum:
        step = slots[1] * s.momentum + step
        new_slots.append(step)
    if centered:
        new_slots.append(average_grad)
    return weights - step, tuple(new_slots)


def update_(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    host_scalars: Sequence[float],
    static: tuple,
) -> None:
    has_momentum, centered = static
    s = RMSpropScalars(*host_scalars)
    velocity = slots[0]
    denom = torch.mul(grad, grad)  # the one allocation: g^2, then the denominator
    velocity.mul_(s.rho).add_(denom, alpha=s.one_minus_rho)
    torch.add(velocity, s.epsilon, out=denom)
    if centered:
        average_grad = slots[-1]
        average_grad.mul_(s.rho).add_(grad, alpha=s.one_minus_rho)
        denom.addcmul_(average_grad, average_grad, value=-1.0)
    step = grad.mul_(s.learning_rate).div_(denom.sqrt_())  # grad is scratch now
    if has_momentum:
        step = slots[1].mul_(s.momentum).add_(step)
    weights.sub_(step)
