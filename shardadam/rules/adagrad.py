"""Adagrad as Keras 3 computes it on the torch backend (see ``shardadam.rules`` for the contract).

Per step, on the decayed weights w and the processed gradient g:
    a <- a + g^2                                    (a starts at initial_accumulator_value)
    w <- w - (g * lr) / sqrt(a + epsilon)
Where torch.optim.Adagrad differs: Keras adds epsilon inside the square root (torch: sqrt(a) +
eps); torch's accumulator (``sum``) starts at 0 by default, Keras's at 0.1, and its defaults
differ otherwise too (lr 0.01, eps 1e-10 against 0.001, 1e-7); Keras has no ``lr_decay``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import check_number_range

NAME = "Adagrad"
LEARNING_RATE = 0.001
HYPERPARAMETERS: dict[str, Any] = {"initial_accumulator_value": 0.1, "epsilon": 1e-7}

GROUP_KEYS = {"epsilon": ("eps", None)}
"""Where torch.optim.Adagrad keeps epsilon in a param group."""


class AdagradScalars(NamedTuple):
    learning_rate: Tensor
    epsilon: Tensor


def check(hp: Mapping[str, Any], where: str = "") -> None:
    # Keras documents a non-negative initial_accumulator_value but checks nothing; a negative
    # one (or epsilon) takes the square root of a negative number (NaN) at the first step.
    initial, epsilon = hp["initial_accumulator_value"], hp["epsilon"]
    check_number_range(initial, f"initial_accumulator_value{where}", low=0.0)
    check_number_range(epsilon, f"epsilon{where}", low=0.0)
    if initial == 0 and epsilon == 0:  # Keras accepts this
        raise ValueError(
            f"Invalid initial_accumulator_value and epsilon{where}: both 0 (expected one of "
            "them > 0: an element whose gradients have all been 0 would divide 0 by 0)"
        )


def slots(hp: Mapping[str, Any]) -> dict[str, float]:
    return {"accumulator": float(hp["initial_accumulator_value"])}


def static(hp: Mapping[str, Any]) -> tuple:
    return ()


def scalars(hp: Mapping[str, Any], learning_rate: Tensor, step: int, dtype: torch.dtype) -> Tensor:
    # Keras's kernel takes epsilon as a Python float, which torch rounds to the weights' dtype.
    epsilon = torch.tensor(float(hp["epsilon"]), dtype=dtype, device=learning_rate.device)
    return torch.stack(AdagradScalars(learning_rate=learning_rate, epsilon=epsilon))


def update(
    weights: Tensor, grad: Tensor, slots: tuple[Tensor, ...], scalars: Tensor, static: tuple
) -> tuple[Tensor, tuple[Tensor, ...]]:
    s = AdagradScalars(*scalars.unbind(0))
    accumulator = slots[0] + grad * grad
    step = (grad * s.learning_rate) / torch.sqrt(accumulator + s.epsilon)
    return weights - step, (accumulator,)


def update_(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    host_scalars: Sequence[float],
    static: tuple,
) -> None:
    s = AdagradScalars(*host_scalars)
    accumulator = slots[0]
    accumulator.addcmul_(grad, grad)
    denom = torch.add(accumulator, s.epsilon).sqrt_()  # the one allocation
    weights.sub_(grad.mul_(s.learning_rate).div_(denom))  # grad is scratch now
