"""Adadelta as Keras 3 computes it on the torch backend (see ``shardadam.rules`` for the contract).

Per step, on the decayed weights w and the processed gradient g:
    G <- rho * G + (1 - rho) * g^2                  (accumulated_grad)
    d <- (sqrt(D + epsilon) * g) / sqrt(G + epsilon), with the previous step's D
    D <- rho * D + (1 - rho) * d^2                  (accumulated_delta_var)
    w <- w - lr * d
Zeiler's method has no learning rate (lr = 1, as torch's default); Keras multiplies the step
by lr, 0.001 by default, so its default steps are a thousandth of the paper's (and of torch's).
torch.optim.Adadelta has the same formula, with sqrt(D + eps) divided by sqrt(G + eps) before
the product with g, and other defaults (rho 0.9, eps 1e-6 against 0.95, 1e-7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import check_number_range

NAME = "Adadelta"
LEARNING_RATE = 0.001
HYPERPARAMETERS: dict[str, Any] = {"rho": 0.95, "epsilon": 1e-7}

GROUP_KEYS = {"epsilon": ("eps", None)}
"""Where torch.optim.Adadelta keeps epsilon in a param group (``rho`` keeps its name)."""


class AdadeltaScalars(NamedTuple):
    learning_rate: Tensor
    rho: Tensor
    one_minus_rho: Tensor
    epsilon: Tensor


def check(hp: Mapping[str, Any], where: str = "") -> None:
    # Keras checks neither. A rho outside [0, 1] is no decay rate; epsilon = 0, which Keras
    # accepts, never moves the weights (D starts at 0, so every d is 0) and divides 0 by 0
    # where the gradients have all been 0.
    check_number_range(hp["rho"], f"rho{where}", low=0.0, high=1.0)
    check_number_range(hp["epsilon"], f"epsilon{where}", low=0.0, low_open=True)


def slots(hp: Mapping[str, Any]) -> dict[str, float]:
    return {"accumulated_grad": 0.0, "accumulated_delta_var": 0.0}


def static(hp: Mapping[str, Any]) -> tuple:
    return ()


def scalars(hp: Mapping[str, Any], learning_rate: Tensor, step: int, dtype: torch.dtype) -> Tensor:
    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype, device=learning_rate.device)  # from the double

    rho = float(hp["rho"])
    return torch.stack(
        AdadeltaScalars(
            learning_rate=learning_rate,
            rho=scalar(rho),
            one_minus_rho=scalar(1.0 - rho),
            epsilon=scalar(float(hp["epsilon"])),
        )
    )


def update(
    weights: Tensor, grad: Tensor, slots: tuple[Tensor, ...], scalars: Tensor, static: tuple
) -> tuple[Tensor, tuple[Tensor, ...]]:
    s = AdadeltaScalars(*scalars.unbind(0))
    accumulated_grad = slots[0] * s.rho + (grad * grad) * s.one_minus_rho
    delta = (torch.sqrt(slots[1] + s.epsilon) * grad) / torch.sqrt(accumulated_grad + s.epsilon)
    accumulated_delta = slots[1] * s.rho + (delta * delta) * s.one_minus_rho
    return weights - delta * s.learning_rate, (accumulated_grad, accumulated_delta)


def update_(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    host_scalars: Sequence[float],
    static: tuple,
) -> None:
    s = AdadeltaScalars(*host_scalars)
    accumulated_grad, accumulated_delta = slots
    scratch = torch.mul(grad, grad)  # the one allocation: g^2, each root, then d^2
    accumulated_grad.mul_(s.rho).add_(scratch, alpha=s.one_minus_rho)
    delta = grad.mul_(torch.add(accumulated_delta, s.epsilon, out=scratch).sqrt_())
    delta.div_(torch.add(accumulated_grad, s.epsilon, out=scratch).sqrt_())  # grad is scratch
    accumulated_delta.mul_(s.rho).add_(torch.mul(delta, delta, out=scratch), alpha=s.one_minus_rho)
    weights.add_(delta, alpha=-s.learning_rate)
