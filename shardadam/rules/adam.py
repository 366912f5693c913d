"""Adam as Keras 3 computes it (see ``shardadam.rules`` for the contract).

Per step t, on the decayed weights w and the processed gradient g:
    m <- m * beta_1 + g * (1 - beta_1)
    v <- v * beta_2 + g^2 * (1 - beta_2)                (AMSGrad: v_hat <- max(v_hat, v))
    w <- w - (m * alpha) / (sqrt(v or v_hat) + epsilon)
with alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t).
Keras folds the bias corrections into alpha and adds epsilon to sqrt(v), where torch's Adam
adds it to sqrt(v) / sqrt(1 - beta_2^t): Note [Keras scalars] in ``functional``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import check_beta, check_bool, check_number_range
from ..functional import (
    engine_scalars,
    host_scalar,
    shard_step_,
    shard_step_inplace_,
)

NAME = "Adam"
LEARNING_RATE = 0.001
HYPERPARAMETERS: dict[str, Any] = {
    "beta_1": 0.9,
    "beta_2": 0.999,
    "epsilon": 1e-7,
    "amsgrad": False,
}

GROUP_KEYS = {
    "beta_1": ("betas", 0),
    "beta_2": ("betas", 1),
    "epsilon": ("eps", None),
    "amsgrad": ("amsgrad", None),
}
"""Where torch's Adam keeps these in a param group (its LR schedulers may cycle betas)."""


class AdamScalars(NamedTuple):
    alpha: Tensor
    beta_1: Tensor
    one_minus_beta_1: Tensor
    beta_2: Tensor
    one_minus_beta_2: Tensor
    epsilon: Tensor


def check(hp: Mapping[str, Any], where: str = "") -> None:
    check_beta(hp["beta_1"], f"beta_1{where}")
    check_beta(hp["beta_2"], f"beta_2{where}")
    check_number_range(hp["epsilon"], f"epsilon{where}", low=0.0)
    check_bool(hp["amsgrad"], f"amsgrad{where}")


def slots(hp: Mapping[str, Any]) -> dict[str, float]:
    named = {"momentum": 0.0, "velocity": 0.0}
    if hp["amsgrad"]:
        named["velocity_hat"] = 0.0
    return named


def static(hp: Mapping[str, Any]) -> tuple:
    return (bool(hp["amsgrad"]),)


def scalars(hp: Mapping[str, Any], learning_rate: Tensor, step: int, dtype: torch.dtype) -> Tensor:
    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype)  # straight from the Python double

    beta_1, beta_2 = float(hp["beta_1"]), float(hp["beta_2"])
    t = torch.tensor(float(step), dtype=dtype)
    beta_1_power = torch.pow(scalar(beta_1), t)
    beta_2_power = torch.pow(scalar(beta_2), t)
    alpha = learning_rate * torch.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    return torch.stack(
        AdamScalars(
            alpha=alpha,
            beta_1=scalar(beta_1),
            one_minus_beta_1=scalar(1.0 - beta_1),
            beta_2=scalar(beta_2),
            one_minus_beta_2=scalar(1.0 - beta_2),
            epsilon=scalar(float(hp["epsilon"])),
        )
    )


def update(
    weights: Tensor, grad: Tensor, slots: tuple[Tensor, ...], scalars: Tensor, static: tuple
) -> tuple[Tensor, tuple[Tensor, ...]]:
    (amsgrad,) = static
    s = AdamScalars(*scalars.unbind(0))
    m = slots[0] * s.beta_1 + grad * s.one_minus_beta_1
    v = slots[1] * s.beta_2 + grad * grad * s.one_minus_beta_2
    v_max = torch.maximum(slots[2], v) if amsgrad else None
    denom = torch.sqrt(v if v_max is None else v_max) + s.epsilon
    new_weights = weights - m * s.alpha / denom
    return new_weights, (m, v) if v_max is None else (m, v, v_max)


def update_(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    host_scalars: Sequence[float],
    static: tuple,
) -> None:
    (amsgrad,) = static
    s = AdamScalars(*host_scalars)
    exp_avg, exp_avg_sq = slots[0], slots[1]
    exp_avg.mul_(s.beta_1).add_(grad, alpha=s.one_minus_beta_1)
    exp_avg_sq.mul_(s.beta_2).addcmul_(grad, grad, value=s.one_minus_beta_2)
    if amsgrad:
        torch.maximum(slots[2], exp_avg_sq, out=slots[2])
    denom = torch.sqrt(slots[2] if amsgrad else exp_avg_sq, out=grad)  # grad is scratch now
    weights.addcdiv_(exp_avg, denom.add_(s.epsilon).div_(s.alpha), value=-1.0)


# The whole Adam step on one flat shard with the engine's parts (clip, decay, masks, EMA,
# master), as the optimizer runs it: for kernel benchmarks and tests of the kernels alone.


def update_scalars(
    learning_rate: float | Tensor,
    beta_1: float,
    beta_2: float,
    epsilon: float,
    weight_decay: float,
    step: int,
    grad_scale: Tensor | float = 1.0,
    clip_value: float | None = None,
    ema_momentum: float = 0.0,
    ema_overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Adam's scalars for step ``step`` (1-based) followed by the engine's, packed."""
    lr = host_scalar(learning_rate, dtype)
    hp = {"beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon}
    engine = engine_scalars(
        lr, weight_decay, grad_scale, clip_value, ema_momentum, ema_overwrite, dtype
    )
    return torch.cat([scalars(hp, lr, step, dtype), engine])


def _slots(*tensors: Tensor | None) -> tuple[tuple[Tensor, ...], tuple]:
    present = tuple(t for t in tensors if t is not None)
    return present, (len(present) == 3,)


def adam_shard_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_sq_max: Tensor | None,
    ema: Tensor | None,
    master: Tensor | None,
    decay_mask: Tensor | None,
    grad_mask: Tensor | None,
    scalars: Tensor,
) -> Tensor:
    """The compiled form's math (``functional.shard_step_``) with Adam's update."""
    slot_tensors, amsgrad = _slots(exp_avg, exp_avg_sq, exp_avg_sq_max)
    return shard_step_(
        _THIS_RULE, amsgrad, param, grad, slot_tensors, ema, master, decay_mask, grad_mask, scalars
    )


def adam_shard_step_inplace_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_sq_max: Tensor | None,
    ema: Tensor | None,
    master: Tensor | None,
    decay_mask: Tensor | None,
    grad_mask: Tensor | None,
    scalars: Tensor,
    host_scalars: Tensor | None = None,
    grad_scale: Tensor | None = None,
) -> Tensor:
    """The eager form (``functional.shard_step_inplace_``) with Adam's update."""
    slot_tensors, amsgrad = _slots(exp_avg, exp_avg_sq, exp_avg_sq_max)
    return shard_step_inplace_(
        _THIS_RULE, amsgrad, param, grad, slot_tensors, ema, master, decay_mask, grad_mask,
        scalars, host_scalars=host_scalars, grad_scale=grad_scale,
    )  # fmt: skip


_THIS_RULE = sys.modules[__name__]
