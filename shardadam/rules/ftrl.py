"""FTRL-Proximal as Keras 3 computes it (see ``shardadam.rules`` for the contract).

Per step, on the decayed weights w and the processed gradient g, with p = learning_rate_power:
    n' = n + g^2                                   (the raw g: no shrinkage in the accumulator)
    z <- z + (g + 2 * shrinkage * w) - ((n'^-p - n^-p) / lr) * w
    w <- (clip(z, -l1, l1) - z) / (n'^-p / lr + 2 * (l2 + beta / (2 * lr)))
The weight is overwritten, not incremented: a function of n and the linear term z alone, as in
McMahan et al. (2013, Algorithm 1, where -p = 1/2), whose (beta + sqrt(n)) / alpha + l2 is
here n^-p / lr + beta / lr + 2 * l2 (l2 doubled, TensorFlow's convention). Keras has no
torch-specific Ftrl: its generic update_step is the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import check_number_range

NAME = "Ftrl"
LEARNING_RATE = 0.001
HYPERPARAMETERS: dict[str, Any] = {
    "learning_rate_power": -0.5,
    "initial_accumulator_value": 0.1,
    "l1_regularization_strength": 0.0,
    "l2_regularization_strength": 0.0,
    "l2_shrinkage_regularization_strength": 0.0,
    "beta": 0.0,
}


class FtrlScalars(NamedTuple):
    learning_rate: Tensor
    power: Tensor
    """-learning_rate_power, the exponent of the accumulator."""
    two_shrinkage: Tensor
    """2 * l2_shrinkage_regularization_strength, in Python double then rounded."""
    two_l2: Tensor
    """2 * (l2_regularization_strength + beta / (2 * lr)), formed in the compute dtype."""
    l1: Tensor


def check_learning_rate(value: float, where: str = "") -> None:
    """Ftrl divides by the learning rate: at 0 every weight becomes NaN (Keras's too)."""
    if not value > 0:
        raise ValueError(
            f"Invalid learning_rate{where}: {value} (Ftrl divides by the learning rate, so "
            "expected learning_rate > 0; a schedule that reaches 0, such as a warmup from 0, "
            "cannot drive it)"
        )


def check(hp: Mapping[str, Any], where: str = "") -> None:
    """Keras's refusals, in its order. Besides: numbers only (Keras compares them with 0, so a
    callable fails there too); beta >= 0 (unchecked by Keras; a negative one can make the
    quadratic term 0); and the case below."""
    check_number_range(hp["initial_accumulator_value"], f"initial_accumulator_value{where}", 0.0)
    check_number_range(hp["learning_rate_power"], f"learning_rate_power{where}", high=0.0)
    for name in list(HYPERPARAMETERS)[2:]:  # the three strengths and beta
        check_number_range(hp[name], f"{name}{where}", low=0.0)
    # Keras accepts it: an element whose gradients are all 0 so far has n^-p = 0, a quadratic
    # term of 0, and the weight 0/0.
    if hp["initial_accumulator_value"] == 0 and hp["learning_rate_power"] < 0:
        if hp["l2_regularization_strength"] == 0 and hp["beta"] == 0:
            raise ValueError(
                f"Invalid initial_accumulator_value{where}: 0 (expected "
                "initial_accumulator_value > 0 when learning_rate_power < 0 and "
                "l2_regularization_strength and beta are 0: an element whose gradients are "
                "all 0 would get the weight 0/0)"
            )


def slots(hp: Mapping[str, Any]) -> dict[str, float]:
    return {"accumulator": float(hp["initial_accumulator_value"]), "linear": 0.0}


def static(hp: Mapping[str, Any]) -> tuple:
    return ()


def scalars(hp: Mapping[str, Any], learning_rate: Tensor, step: int, dtype: torch.dtype) -> Tensor:
    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype)  # straight from the Python double

    # Keras writes beta / (2.0 * lr) on tensors, which torch evaluates as reciprocal * beta.
    beta_over_two_lr = torch.reciprocal(2.0 * learning_rate) * scalar(float(hp["beta"]))
    l2 = scalar(float(hp["l2_regularization_strength"])) + beta_over_two_lr
    return torch.stack(
        FtrlScalars(
            learning_rate=learning_rate,
            power=scalar(-float(hp["learning_rate_power"])),
            two_shrinkage=scalar(2.0 * float(hp["l2_shrinkage_regularization_strength"])),
            two_l2=2 * l2,
            l1=scalar(float(hp["l1_regularization_strength"])),
        )
    )


def update(
    weights: Tensor, grad: Tensor, slots: tuple[Tensor, ...], scalars: Tensor, static: tuple
) -> tuple[Tensor, tuple[Tensor, ...]]:
    s = FtrlScalars(*scalars.unbind(0))
    accumulator, linear = slots
    new_accumulator = accumulator + grad * grad
    new_power = torch.pow(new_accumulator, s.power)
    sigma = (new_power - torch.pow(accumulator, s.power)) / s.learning_rate
    new_linear = linear + ((grad + s.two_shrinkage * weights) - sigma * weights)
    quadratic = new_power / s.learning_rate + s.two_l2
    new_weights = (torch.clamp(new_linear, -s.l1, s.l1) - new_linear) / quadratic
    return new_weights, (new_accumulator, new_linear)


def update_(
    weights: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    host_scalars: Sequence[float],
    static: tuple,
) -> None:
    s = FtrlScalars(*host_scalars)
    accumulator, linear = slots
    # A tensor exponent, as Keras's: torch.pow with a Python 0.5 takes sqrt, an ulp apart.
    power = torch.tensor(s.power, dtype=accumulator.dtype)
    # Two temporaries. Keras's roundings are kept (g^2 and 2 * shrinkage * w rounded before
    # their sums, where addcmul_ and add_(alpha=) fuse them; z + (g - sigma * w) in that
    # order): the difference n'^-p - n^-p cancels most digits, and an ulp off there or in z
    # cost up to a fifth of the tolerance in 50 steps.
    old_power = torch.pow(accumulator, power)
    scratch = torch.mul(grad, grad)
    accumulator.add_(scratch)
    if s.two_shrinkage != 0.0:
        grad.add_(torch.mul(weights, s.two_shrinkage, out=scratch))
    new_power = torch.pow(accumulator, power, out=scratch)
    sigma_w = torch.sub(new_power, old_power, out=old_power).div_(s.learning_rate).mul_(weights)
    linear.add_(grad.sub_(sigma_w))
    quadratic = new_power.div_(s.learning_rate).add_(s.two_l2)
    numerator = torch.clamp(linear, -s.l1, s.l1, out=sigma_w).sub_(linear)
    torch.div(numerator, quadratic, out=weights)
