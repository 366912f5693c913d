"""Nadam as Keras 3 computes it on the torch backend (see ``shardadam.rules`` for the contract).

Per step t, on the decayed weights w and the processed gradient g, with the momentum schedule
u_t = beta_1 * (1 - 0.5 * 0.96^t) and the optimizer-wide product P_t = u_1 * ... * u_t:
    m <- m * beta_1 + g * (1 - beta_1)
    v <- v * beta_2 + g^2 * (1 - beta_2)
    m_hat = m * u_{t+1} / (1 - P_t * u_{t+1}) + g * (1 - u_t) / (1 - P_t)
    w <- w - (m_hat * lr) / (sqrt(v / (1 - beta_2^t)) + epsilon)
P_t is Keras's float32 variable ``u_product``, multiplied by u_t once per applied step: here
the ``CARRY``, which the engine keeps and checkpoints. Keras's schedule is 0.96^t, where
Dozat's paper and torch.optim.NAdam use 0.96^(0.004 t) (``momentum_decay``): Keras's u_t
reaches beta_1 within a hundred steps, torch's stays near beta_1 / 2 for thousands.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import check_beta, check_number_range

NAME = "Nadam"
LEARNING_RATE = 0.001
HYPERPARAMETERS: dict[str, Any] = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}

GROUP_KEYS = {"beta_1": ("betas", 0), "beta_2": ("betas", 1), "epsilon": ("eps", None)}
"""Where torch.optim.NAdam keeps these in a param group (its LR schedulers may cycle betas)."""

CARRY = {"u_product": 1.0}
"""Keras's ``u_product``: the product of the momentum schedule over the applied steps."""

_SCHEDULE_BASE = 0.96


class NadamScalars(NamedTuple):
    """u_t, u_{t+1} and P_t as in the module docstring, the products P_t * u_{t+1}."""

    learning_rate: Tensor
    beta_1: Tensor
    one_minus_beta_1: Tensor
    beta_2: Tensor
    one_minus_beta_2: Tensor
    epsilon: Tensor
    next_u: Tensor
    one_minus_next_u_product: Tensor
    one_minus_u: Tensor
    one_minus_u_product: Tensor
    bias_correction_2: Tensor  # 1 - beta_2^t


def check(hp: Mapping[str, Any], where: str = "") -> None:
    # Keras checks none of these. beta_2 = 1 divides by 1 - 1^t = 0; beta_1 = 1 would keep
    # the momentum at 0; a beta outside [0, 1) is no decay rate; a negative epsilon can make
    # sqrt(v_hat) + epsilon 0.
    check_beta(hp["beta_1"], f"beta_1{where}")
    check_beta(hp["beta_2"], f"beta_2{where}")
    check_number_range(hp["epsilon"], f"epsilon{where}", low=0.0)


def slots(hp: Mapping[str, Any]) -> dict[str, float]:
    return {"momentum": 0.0, "velocity": 0.0}


def static(hp: Mapping[str, Any]) -> tuple:
    return ()


def scalars(
    hp: Mapping[str, Any], learning_rate: Tensor, step: int, dtype: torch.dtype, carry: Mapping
) -> tuple[Tensor, dict[str, Tensor]]:
    """The packed scalars and the advanced ``u_product``. Keras forms the schedule from beta_1
    and 0.96 cast to ``dtype``, but the moments' 1 - beta_1 in Python double."""

    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype)  # straight from the Python double

    beta_1, beta_2 = float(hp["beta_1"]), float(hp["beta_2"])
    base, t = scalar(_SCHEDULE_BASE), scalar(float(step))
    u = scalar(beta_1) * (1.0 - 0.5 * torch.pow(base, t))
    next_u = scalar(beta_1) * (1.0 - 0.5 * torch.pow(base, scalar(float(step + 1))))
    u_product = carry["u_product"].to(dtype) * u
    packed = torch.stack(
        NadamScalars(
            learning_rate=learning_rate,
            beta_1=scalar(beta_1),
            one_minus_beta_1=scalar(1.0 - beta_1),
            beta_2=scalar(beta_2),
            one_minus_beta_2=scalar(1.0 - beta_2),
            epsilon=scalar(float(hp["epsilon"])),
            next_u=next_u,
            one_minus_next_u_product=1 - u_product * next_u,
            one_minus_u=1 - u,
            one_minus_u_product=1 - u_product,
            bias_correction_2=1 - torch.pow(scalar(beta_2), t),
        )
    )
    return packed, {"u_product": u_product}


def update(
    weights: Tensor, grad: Tensor, slots: tuple[Tensor, ...], scalars: Tensor, static: tuple
) -> tuple[Tensor, tuple[Tensor, ...]]:
    s = NadamScalars(*scalars.unbind(0))
    momentum, velocity = slots
    m = momentum * s.beta_1 + grad * s.one_minus_beta_1
    v = velocity * s.beta_2 + (grad * grad) * s.one_minus_beta_2
    momentum_part = (m * s.next_u) / s.one_minus_next_u_product
    m_hat = momentum_part + (grad * s.one_minus_u) / s.one_minus_u_product
    denom = torch.sqrt(v / s.bias_correction_2) + s.epsilon
    return weights - (m_hat * s.learning_rate) / denom, (m, v)


def update_(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    host_scalars: Sequence[float],
    static: tuple,
) -> None:
    s = NadamScalars(*host_scalars)
    momentum, velocity = slots
    momentum.mul_(s.beta_1).add_(grad, alpha=s.one_minus_beta_1)
    # One temporary: g^2 first (Keras rounds it before the factor; addcmul_ would not), then
    # m_hat, which needs m and g while sqrt(v_hat) takes grad's buffer.
    scratch = torch.mul(grad, grad)
    velocity.mul_(s.beta_2).add_(scratch, alpha=s.one_minus_beta_2)
    m_hat = torch.mul(momentum, s.next_u, out=scratch).div_(s.one_minus_next_u_product)
    m_hat.add_(grad.mul_(s.one_minus_u).div_(s.one_minus_u_product))  # grad is scratch now
    denom = torch.div(velocity, s.bias_correction_2, out=grad).sqrt_().add_(s.epsilon)
    weights.sub_(m_hat.mul_(s.learning_rate).div_(denom))
