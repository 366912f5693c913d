"""SGD as Keras 3 computes it on the torch backend (see ``shardadam.rules`` for the contract).

Per step, on the decayed weights w and the processed gradient g:
    w <- w - lr * g                                 (momentum == 0)
    m <- momentum * m - lr * g                      (momentum != 0)
    w <- w + m                                      (nesterov=False)
    w <- w - lr * g + momentum * m                  (nesterov=True, with the new m)
Where torch.optim.SGD differs: torch's buffer sums raw gradients (b <- momentum * b + g, then
w <- w - lr * b), so Keras's ``momentum`` slot is a velocity already scaled by the learning
rate and of the opposite sign (-lr * b for a constant lr; under a schedule each past step keeps
the rate it was taken with, where torch rescales the whole buffer by today's). Keras has no
dampening, and ignores ``nesterov`` when momentum is 0 (torch refuses that combination).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import check_bool, check_number_range

NAME = "SGD"
LEARNING_RATE = 0.01
HYPERPARAMETERS: dict[str, Any] = {"momentum": 0.0, "nesterov": False}


class SGDScalars(NamedTuple):
    learning_rate: Tensor
    momentum: Tensor


def check(hp: Mapping[str, Any], where: str = "") -> None:
    momentum = hp["momentum"]
    # Keras's own check: `momentum` must be a float between [0, 1]. It refuses an int (even 0
    # or 1), so we do too; it lets NaN through (both of its comparisons are false), we do not.
    if not isinstance(momentum, float):
        raise TypeError(
            f"Invalid momentum{where}: {momentum!r} (expected a float in [0, 1]; Keras 3 "
            "refuses other types, ints included)"
        )
    check_number_range(momentum, f"momentum{where}", low=0.0, high=1.0)
    # Keras takes any truthy value as True; a non-bool here is more likely a misplaced argument.
    check_bool(hp["nesterov"], f"nesterov{where}")


def slots(hp: Mapping[str, Any]) -> dict[str, float]:
    return {"momentum": 0.0} if hp["momentum"] != 0 else {}


def static(hp: Mapping[str, Any]) -> tuple:
    has_momentum = hp["momentum"] != 0
    return (has_momentum, has_momentum and bool(hp["nesterov"]))  # nesterov needs momentum


def scalars(hp: Mapping[str, Any], learning_rate: Tensor, step: int, dtype: torch.dtype) -> Tensor:
    # Keras's kernels take momentum as a Python float, which torch rounds to the weights' dtype.
    momentum = torch.tensor(float(hp["momentum"]), dtype=dtype, device=learning_rate.device)
    return torch.stack(SGDScalars(learning_rate=learning_rate, momentum=momentum))


def update(
    weights: Tensor, grad: Tensor, slots: tuple[Tensor, ...], scalars: Tensor, static: tuple
) -> tuple[Tensor, tuple[Tensor, ...]]:
    has_momentum, nesterov = static
    s = SGDScalars(*scalars.unbind(0))
    if not has_momentum:
        return weights - grad * s.learning_rate, ()
    velocity = slots[0] * s.momentum - grad * s.learning_rate
    if nesterov:
        new_weights = (weights - grad * s.learning_rate) + velocity * s.momentum
    else:
        new_weights = weights + velocity
    return new_weights, (velocity,)


def update_(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    host_scalars: Sequence[float],
    static: tuple,
) -> None:
    has_momentum, nesterov = static
    s = SGDScalars(*host_scalars)
    if not has_momentum:
        weights.add_(grad, alpha=-s.learning_rate)
        return
    velocity = slots[0]
    velocity.mul_(s.momentum).add_(grad, alpha=-s.learning_rate)
    if nesterov:
        weights.add_(grad, alpha=-s.learning_rate).add_(velocity, alpha=s.momentum)
    else:
        weights.add_(velocity)
