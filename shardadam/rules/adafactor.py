"""Adafactor as Keras 3 computes it (see ``shardadam.rules`` for the contract; a factored and
per-tensor rule).

Per step t, on the decayed weights w and the processed gradient g of one tensor, with
beta = 1 - t^beta_2_decay and s = g^2 + epsilon_1:
    tensors of 2+ dims [..., R, C]: r <- beta r + (1 - beta) mean of s over each row (C)
                                    c <- beta c + (1 - beta) mean of s over each column (R)
                                    v  = (r / mean of r over the matrix's rows) x c
    others:                         v <- beta v + (1 - beta) s
    u  = g / sqrt(v)
    w <- w - alpha * (u / max(1, rms(u) / clip_threshold)),
         alpha = max(epsilon_2, rms(w)) * min(lr, 1 / sqrt(t))
r and c are kept per row and per column (Note [factored state] in ``factored``); the row and
column means, the matrix means of r and the RMS of w and u span a tensor that shard
boundaries may cut, so the engine computes them across ranks. Keras keeps ``velocity`` for
every element, the factored estimate included; so does this rule. ``relative_step`` changes
nothing in Keras 3 (the step size takes min(lr, 1/sqrt(t)) either way); it is accepted and
checked as Keras accepts it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import check_bool, check_number_range

NAME = "Adafactor"
LEARNING_RATE = 0.001
HYPERPARAMETERS: dict[str, Any] = {
    "beta_2_decay": -0.8,
    "epsilon_1": 1e-30,
    "epsilon_2": 1e-3,
    "clip_threshold": 1.0,
    "relative_step": True,
}

FACTORED_SLOTS = ("r", "c")
"""Per tensor of 2+ dims: the row state (shape[:-1]) and the column state (shape[:-2] +
shape[-1:]), named as Keras's attributes ``_r`` and ``_c``; 0 at the start."""

TENSOR_STATS = ("weight_sq", "update_sq")
"""Per-tensor sums of ``tensor_terms``: sum of w^2 and of u^2 (their means are the RMS)."""

TENSOR_FACTORS = ("alpha", "divisor")
"""The rows of ``tensor_factors``: the step max(epsilon_2, rms(w)) * rho_t, and
max(1, rms(u) / clip_threshold)."""


class AdafactorScalars(NamedTuple):
    step_size: Tensor
    """rho_t = min(lr, 1 / sqrt(t))"""
    beta: Tensor
    """beta_2_t = 1 - t^beta_2_decay"""
    one_minus_beta: Tensor
    epsilon_1: Tensor
    epsilon_2: Tensor
    clip_threshold: Tensor


def check(hp: Mapping[str, Any], where: str = "") -> None:
    # Keras checks none of them. beta_2_decay > 0 makes beta_2_t negative from step 2 (the
    # averages then grow without bound or turn negative: NaN); epsilon_1 is what keeps the
    # second moment of a zero gradient (a frozen row, unused embedding rows) away from 0/0;
    # clip_threshold divides.
    check_number_range(hp["beta_2_decay"], f"beta_2_decay{where}", high=0.0)
    check_number_range(hp["epsilon_1"], f"epsilon_1{where}", low=0.0, low_open=True)
    check_number_range(hp["epsilon_2"], f"epsilon_2{where}", low=0.0)
    check_number_range(hp["clip_threshold"], f"clip_threshold{where}", low=0.0, low_open=True)
    check_bool(hp["relative_step"], f"relative_step{where}")


def slots(hp: Mapping[str, Any]) -> dict[str, float]:
    return {"velocity": 0.0}


def static(hp: Mapping[str, Any]) -> tuple:
    return ()


def scalars(hp: Mapping[str, Any], learning_rate: Tensor, step: int, dtype: torch.dtype) -> Tensor:
    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype)  # straight from the Python double

    t = torch.tensor(float(step), dtype=dtype)
    beta = 1 - torch.pow(t, float(hp["beta_2_decay"]))
    return torch.stack(
        AdafactorScalars(
            step_size=torch.minimum(learning_rate, 1 / torch.sqrt(t)),
            beta=beta,
            one_minus_beta=1 - beta,
            epsilon_1=scalar(float(hp["epsilon_1"])),
            epsilon_2=scalar(float(hp["epsilon_2"])),
            clip_threshold=scalar(float(hp["clip_threshold"])),
        )
    )


def row_col_terms(
    weights: Tensor, grad: Tensor, slots: tuple[Tensor, ...], scalars: Tensor, static: tuple
) -> Tensor:
    """Elementwise g^2 + epsilon_1, whose row and column means feed r and c."""
    return grad * grad + AdafactorScalars(*scalars.unbind(0)).epsilon_1


def factored_state(
    r: Tensor, c: Tensor, row_means: Tensor, col_means: Tensor, scalars: Tensor, static: tuple
) -> tuple[Tensor, Tensor]:
    """The new row and column state from the means of ``row_col_terms``."""
    s = AdafactorScalars(*scalars.unbind(0))
    return s.beta * r + s.one_minus_beta * row_means, s.beta * c + s.one_minus_beta * col_means


def factored_values(
    r: Tensor, c: Tensor, r_matrix_means: Tensor, scalars: Tensor, static: tuple
) -> tuple[Tensor, Tensor]:
    """The row and column values whose product is each element's second moment: r over the
    mean of r in its matrix (``r_matrix_means``: each row's), and c."""
    return r / r_matrix_means, c


def _second_moment(grad: Tensor, velocity: Tensor, s: AdafactorScalars, factors: Tensor) -> Tensor:
    """v: the factored estimate (``factors[0]``) where ``factors[1]`` is 1, else the average."""
    average = s.beta * velocity + s.one_minus_beta * (grad * grad + s.epsilon_1)
    return torch.where(factors[1] > 0, factors[0], average)


def tensor_terms(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    scalars: Tensor,
    static: tuple,
    factors: Tensor,
) -> Tensor:
    """Elementwise w^2 and u^2, stacked in the order of ``TENSOR_STATS``."""
    s = AdafactorScalars(*scalars.unbind(0))
    u = grad / torch.sqrt(_second_moment(grad, slots[0], s, factors))
    return torch.stack([weights * weights, u * u])


def tensor_factors(sums: Tensor, sizes: Tensor, scalars: Tensor, static: tuple) -> Tensor:
    """Per tensor ``[2, tensors]``: the step alpha and the divisor max(1, rms(u) / clip)."""
    s = AdafactorScalars(*scalars.unbind(0))
    alpha = torch.maximum(s.epsilon_2, torch.sqrt(sums[0] / sizes)) * s.step_size
    divisor = torch.maximum(torch.ones_like(alpha), torch.sqrt(sums[1] / sizes) / s.clip_threshold)
    return torch.stack([alpha, divisor])


def update(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    scalars: Tensor,
    static: tuple,
    factors: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``factors``: the factored estimate and its 0/1 mask, then alpha and the divisor."""
    s = AdafactorScalars(*scalars.unbind(0))
    v = _second_moment(grad, slots[0], s, factors)
    u = grad / torch.sqrt(v)
    divisor = factors[3]
    clipped = torch.where(divisor > 0, u / divisor, torch.zeros_like(u))  # 0 on padding
    return weights - factors[2] * clipped, (v,)


def update_(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    host_scalars: Sequence[float],
    static: tuple,
    factors: Tensor,
) -> None:
    s = AdafactorScalars(*host_scalars)
    (velocity,) = slots
    square = torch.mul(grad, grad).add_(s.epsilon_1)
    velocity.mul_(s.beta).add_(square.mul_(s.one_minus_beta))
    torch.where(factors[1] > 0, factors[0], velocity, out=velocity)
    u = grad.div_(velocity.sqrt())
    divisor = factors[3]
    u.div_(torch.where(divisor > 0, divisor, torch.ones_like(divisor)))
    weights.sub_(u.mul_(factors[2]))
