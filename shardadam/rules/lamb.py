"""Lamb as Keras 3 computes it (see ``shardadam.rules`` for the contract; a per-tensor rule).

Per step t, on the decayed weights w and the processed gradient g of one tensor:
    m <- m + (g - m) * (1 - beta_1)
    v <- v + (g^2 - v) * (1 - beta_2)
    u  = (m / (1 - beta_1^t)) / (sqrt(v / (1 - beta_2^t)) + epsilon)
    w <- w - (ratio * lr) * u,    ratio = ||w|| / ||u||   (1 where either norm is 0)
The trust ratio is per tensor: ||w|| and ||u|| sum over the whole tensor, whose elements a shard
boundary may put on several ranks, so the engine sums ``tensor_terms`` over each tensor across
ranks (one small all-reduce per step) and hands ``update`` the ratio of each element's tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import check_beta, check_number_range

NAME = "Lamb"
LEARNING_RATE = 0.001
HYPERPARAMETERS: dict[str, Any] = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}

GROUP_KEYS = {"beta_1": ("betas", 0), "beta_2": ("betas", 1), "epsilon": ("eps", None)}
"""torch's keys for these, as its Adam-like optimizers (and LAMB implementations) keep them."""

TENSOR_STATS = ("weight_sq", "update_sq")
"""Per-tensor sums of ``tensor_terms``: ||w||^2 and ||u||^2."""

TENSOR_FACTORS = ("trust_ratio",)
"""The rows of ``tensor_factors``."""


class LambScalars(NamedTuple):
    learning_rate: Tensor
    one_minus_beta_1: Tensor
    one_minus_beta_2: Tensor
    bias_correction_1: Tensor
    """1 - beta_1^t"""
    bias_correction_2: Tensor
    """1 - beta_2^t"""
    epsilon: Tensor


def check(hp: Mapping[str, Any], where: str = "") -> None:
    # Keras checks none of them; a beta outside [0, 1) is no decay rate (beta_1 = 1 divides by
    # 1 - 1^t = 0 at every step), and a negative epsilon can divide by zero.
    check_beta(hp["beta_1"], f"beta_1{where}")
    check_beta(hp["beta_2"], f"beta_2{where}")
    check_number_range(hp["epsilon"], f"epsilon{where}", low=0.0)


def slots(hp: Mapping[str, Any]) -> dict[str, float]:
    return {"momentum": 0.0, "velocity": 0.0}


def static(hp: Mapping[str, Any]) -> tuple:
    return ()


def scalars(hp: Mapping[str, Any], learning_rate: Tensor, step: int, dtype: torch.dtype) -> Tensor:
    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype)  # straight from the Python double

    beta_1, beta_2 = float(hp["beta_1"]), float(hp["beta_2"])
    t = torch.tensor(float(step), dtype=dtype)
    return torch.stack(
        LambScalars(
            learning_rate=learning_rate,
            one_minus_beta_1=scalar(1.0 - beta_1),
            one_minus_beta_2=scalar(1.0 - beta_2),
            bias_correction_1=1.0 - torch.pow(scalar(beta_1), t),
            bias_correction_2=1.0 - torch.pow(scalar(beta_2), t),
            epsilon=scalar(float(hp["epsilon"])),
        )
    )


def _moments_and_direction(
    grad: Tensor, slots: tuple[Tensor, ...], s: LambScalars
) -> tuple[Tensor, Tensor, Tensor]:
    momentum, velocity = slots
    m = momentum + (grad - momentum) * s.one_minus_beta_1
    v = velocity + (grad * grad - velocity) * s.one_minus_beta_2
    u = (m / s.bias_correction_1) / (torch.sqrt(v / s.bias_correction_2) + s.epsilon)
    return m, v, u


def tensor_terms(
    weights: Tensor, grad: Tensor, slots: tuple[Tensor, ...], scalars: Tensor, static: tuple
) -> Tensor:
    """Elementwise w^2 and u^2, stacked in the order of ``TENSOR_STATS``."""
    _, _, u = _moments_and_direction(grad, slots, LambScalars(*scalars.unbind(0)))
    return torch.stack([weights * weights, u * u])


def tensor_factors(sums: Tensor, sizes: Tensor, scalars: Tensor, static: tuple) -> Tensor:
    """The trust ratio of each tensor, ``[1, tensors]``, from the sums ``[2, tensors]``."""
    w_norm, u_norm = torch.sqrt(sums[0]), torch.sqrt(sums[1])
    one = torch.ones_like(w_norm)
    ratio = torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, one), one)
    return ratio.unsqueeze(0)


def update(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    scalars: Tensor,
    static: tuple,
    factors: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    s = LambScalars(*scalars.unbind(0))
    m, v, u = _moments_and_direction(grad, slots, s)
    return weights - (factors[0] * s.learning_rate) * u, (m, v)


def update_(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    host_scalars: Sequence[float],
    static: tuple,
    factors: Tensor,
) -> None:
    s = LambScalars(*host_scalars)
    momentum, velocity = slots
    momentum.add_(torch.sub(grad, momentum).mul_(s.one_minus_beta_1))
    velocity.add_(grad.mul_(grad).sub_(velocity).mul_(s.one_minus_beta_2))  # grad is scratch
    denom = torch.div(velocity, s.bias_correction_2, out=grad).sqrt_().add_(s.epsilon)
    u = torch.div(momentum, s.bias_correction_1).div_(denom)
    weights.sub_(u.mul_(factors[0] * s.learning_rate))
