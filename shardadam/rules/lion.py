"""Lion as Keras 3 computes it on the torch backend (see ``shardadam.rules`` for the contract).

Per step, on the decayed weights w and the processed gradient g:
    c = m * beta_1 + g * (1 - beta_1)
    w <- w - lr * sign(c)
    m <- m * beta_2 + g * (1 - beta_2)
As in Chen et al. (2023), the step takes the sign of an interpolation with beta_1 and the
momentum then moves with beta_2. sign(0) is 0 (torch's, as in the authors' implementation):
an element whose c is exactly 0 (a zero gradient on a zero momentum, as at the first step)
does not move, where a sign(0) of +1 would step it by lr.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import check_beta, check_number_range

NAME = "Lion"
LEARNING_RATE = 0.001
HYPERPARAMETERS: dict[str, Any] = {"beta_1": 0.9, "beta_2": 0.99}


class LionScalars(NamedTuple):
    learning_rate: Tensor
    beta_1: Tensor
    one_minus_beta_1: Tensor
    beta_2: Tensor
    one_minus_beta_2: Tensor


def check(hp: Mapping[str, Any], where: str = "") -> None:
    beta_1 = hp["beta_1"]
    if hasattr(beta_1, "dim") and beta_1.dim() == 0:
        beta_1 = float(beta_1)
    if not callable(beta_1):  # a callable is checked on the value it returns, at each step
        # Keras's own range; its message says "[0, 1]" but it refuses 0 (SignSGD).
        check_number_range(beta_1, f"beta_1{where}", low=0.0, low_open=True, high=1.0)
    # Keras does not check beta_2. beta_2 = 1 keeps the momentum at 0 (SignSGD again); a beta
    # outside [0, 1) is no decay rate.
    check_beta(hp["beta_2"], f"beta_2{where}")


def slots(hp: Mapping[str, Any]) -> dict[str, float]:
    return {"momentum": 0.0}


def static(hp: Mapping[str, Any]) -> tuple:
    return ()


def scalars(hp: Mapping[str, Any], learning_rate: Tensor, step: int, dtype: torch.dtype) -> Tensor:
    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype)  # straight from the Python double

    beta_1, beta_2 = float(hp["beta_1"]), float(hp["beta_2"])
    return torch.stack(
        LionScalars(
            learning_rate=learning_rate,
            beta_1=scalar(beta_1),
            one_minus_beta_1=scalar(1.0 - beta_1),
            beta_2=scalar(beta_2),
            one_minus_beta_2=scalar(1.0 - beta_2),
        )
    )


def update(
    weights: Tensor, grad: Tensor, slots: tuple[Tensor, ...], scalars: Tensor, static: tuple
) -> tuple[Tensor, tuple[Tensor, ...]]:
    s = LionScalars(*scalars.unbind(0))
    (momentum,) = slots
    direction = torch.sign(momentum * s.beta_1 + grad * s.one_minus_beta_1)
    new_weights = weights - direction * s.learning_rate
    return new_weights, (momentum * s.beta_2 + grad * s.one_minus_beta_2,)


def update_(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    host_scalars: Sequence[float],
    static: tuple,
) -> None:
    s = LionScalars(*host_scalars)
    (momentum,) = slots
    # One temporary: the direction and the new momentum both read the old momentum and g.
    direction = torch.mul(momentum, s.beta_1).add_(grad, alpha=s.one_minus_beta_1).sign_()
    weights.add_(direction, alpha=-s.learning_rate)  # exact: direction is -1, 0 or 1
    momentum.mul_(s.beta_2).add_(grad, alpha=s.one_minus_beta_2)
