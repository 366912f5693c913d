"""Adamax as Keras 3 computes it on the torch backend (see ``shardadam.rules`` for the contract).

Per step t, on the decayed weights w and the processed gradient g:
    m <- m * beta_1 + g * (1 - beta_1)
    u <- max(u * beta_2, |g|)
    w <- w - (m * lr) / ((u + epsilon) * (1 - beta_1^t))
Keras adds epsilon to the norm ``u`` where it divides; torch.optim.Adamax adds it to ``|g|``
inside the max (``u <- max(u * beta_2, |g| + eps)``), so its ``u`` keeps epsilon and the two
differ where gradients are small. Keras's default epsilon is 1e-7 (torch's 1e-8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import check_beta, check_number_range

NAME = "Adamax"
LEARNING_RATE = 0.001
HYPERPARAMETERS: dict[str, Any] = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}

GROUP_KEYS = {"beta_1": ("betas", 0), "beta_2": ("betas", 1), "epsilon": ("eps", None)}
"""Where torch.optim.Adamax keeps these in a param group (its LR schedulers may cycle betas)."""


class AdamaxScalars(NamedTuple):
    learning_rate: Tensor
    beta_1: Tensor
    one_minus_beta_1: Tensor
    beta_2: Tensor
    epsilon: Tensor
    bias_correction: Tensor
    """1 - beta_1^t, with the power taken in the compute dtype as Keras does."""


def check(hp: Mapping[str, Any], where: str = "") -> None:
    # Keras checks none of these. beta_1 = 1 divides by 1 - 1^t = 0; a beta outside [0, 1) is
    # no decay rate (beta_2 = 1 would keep the largest gradient ever seen, forever); a negative
    # epsilon can make u + epsilon 0.
    check_beta(hp["beta_1"], f"beta_1{where}")
    check_beta(hp["beta_2"], f"beta_2{where}")
    check_number_range(hp["epsilon"], f"epsilon{where}", low=0.0)


def slots(hp: Mapping[str, Any]) -> dict[str, float]:
    return {"momentum": 0.0, "norm": 0.0}


def static(hp: Mapping[str, Any]) -> tuple:
    return ()


def scalars(hp: Mapping[str, Any], learning_rate: Tensor, step: int, dtype: torch.dtype) -> Tensor:
    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype)  # straight from the Python double

    beta_1 = float(hp["beta_1"])
    beta_1_power = torch.pow(scalar(beta_1), scalar(float(step)))
    return torch.stack(
        AdamaxScalars(
            learning_rate=learning_rate,
            beta_1=scalar(beta_1),
            one_minus_beta_1=scalar(1.0 - beta_1),
            beta_2=scalar(float(hp["beta_2"])),
            epsilon=scalar(float(hp["epsilon"])),
            bias_correction=1 - beta_1_power,
        )
    )


def update(
    weights: Tensor, grad: Tensor, slots: tuple[Tensor, ...], scalars: Tensor, static: tuple
) -> tuple[Tensor, tuple[Tensor, ...]]:
    s = AdamaxScalars(*scalars.unbind(0))
    momentum, norm = slots
    m = momentum * s.beta_1 + grad * s.one_minus_beta_1
    u = torch.maximum(norm * s.beta_2, grad.abs())
    new_weights = weights - (m * s.learning_rate) / ((u + s.epsilon) * s.bias_correction)
    return new_weights, (m, u)


def update_(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    host_scalars: Sequence[float],
    static: tuple,
) -> None:
    s = AdamaxScalars(*host_scalars)
    momentum, norm = slots
    momentum.mul_(s.beta_1).add_(grad, alpha=s.one_minus_beta_1)
    torch.maximum(norm.mul_(s.beta_2), grad.abs_(), out=norm)  # grad is scratch from here
    denom = torch.add(norm, s.epsilon, out=grad).mul_(s.bias_correction)
    # w - lr * (m / denom): Keras rounds m * lr first; the two differ by an ulp of the step,
    # and this form needs no shard-sized temporary.
    weights.addcdiv_(momentum, denom, value=-s.learning_rate)
