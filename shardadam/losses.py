"""The training app's loss: what a model's output holds, which loss applies, and how it is
averaged over items and ranks.

A model may return a tensor, a tuple or list (its first element is the output), a dict or a
``transformers`` ``ModelOutput`` (its ``logits``), and may compute its loss itself (a ``loss``
key or attribute, used when the samples hold ``labels``, which the model is then given). Which
loss applies, first match wins:

1. ``trainer.loss``, when set: any callable ``loss(output, target) -> scalar``;
2. the model's own ``loss``, when the samples hold ``labels`` and the model returned one;
3. the data's ``Splits.loss``: ``cross_entropy`` (targets equal to ``ignore_index`` count
   for nothing) or ``mse``.

Note [loss averaging across ranks]
    The data's losses (3.) are the exact mean over the global batch: each rank sums its
    counted items and the counts are summed over ranks (one small all_reduce before backward).
    The reducer averages gradients over ranks, so each rank back-propagates ``its sum *
    world_size / global count``: any world size trains and reports what one process with the
    whole batch would, however the padding falls between ranks. The other losses (1., 2.) are
    means over items the app cannot count: each rank takes its loss as it comes and the ranks
    weigh equally, as DDP does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

__all__ = ["LOSSES", "HeldOutTotal", "LossTerms", "TrainingLoss", "model_prediction"]

LOSSES = ("cross_entropy", "mse")

_OUTPUT_KINDS = (
    "expected a tensor, a tuple or list whose first element is the output, or a dict or "
    "ModelOutput with 'logits' (and 'loss', when the samples hold 'labels')"
)


def model_prediction(output: Any) -> Tensor:
    """The tensor a loss compares with the targets: ``output`` itself, its first element, or its
    ``logits`` (key or attribute)."""
    found = output
    if isinstance(output, (tuple, list)):
        found = output[0] if output else None
    elif isinstance(output, Mapping):  # a transformers ModelOutput is an OrderedDict
        if "logits" not in output:
            raise TypeError(
                f"the model returned a {type(output).__name__} with keys {list(output)} but no "
                f"'logits'; {_OUTPUT_KINDS}"
            )
        found = output["logits"]
    elif not isinstance(output, Tensor) and hasattr(output, "logits"):
        found = output.logits
    if not isinstance(found, Tensor):
        raise TypeError(
            f"the model returned a {type(output).__name__} holding {type(found).__name__}; "
            f"{_OUTPUT_KINDS}"
        )
    return found


def model_computed_loss(output: Any) -> Tensor | None:
    """The loss the model computed itself (a ``loss`` key or attribute), or None."""
    if isinstance(output, Mapping):
        return output.get("loss")
    if isinstance(output, (Tensor, tuple, list)):
        return None
    return getattr(output, "loss", None)


@dataclass(frozen=True)
class LossTerms:
    """One batch's loss on one rank (Note [loss averaging across ranks])."""

    value: Tensor
    """A float32 scalar: the sum over ``count`` items, or a mean where ``count`` is None."""
    count: Tensor | None
    """How many items ``value`` sums (an int64 scalar on value's device), or None."""


class TrainingLoss:
    """The loss of a batch as :class:`LossTerms`; see the module docstring for which applies.

    ``custom`` (``trainer.loss``) is called as the data's loss would be: for ``cross_entropy``
    data with logits ``(items, classes)`` and targets ``(items,)``, for ``mse`` data with the
    output and targets as they come (of equal shapes).
    """

    def __init__(self, kind: str, ignore_index: int = -100, custom: Callable | None = None) -> None:
        if kind not in LOSSES:
            raise ValueError(f"Invalid loss of the data: {kind!r} (expected one of {LOSSES})")
        if custom is not None and not callable(custom):
            raise TypeError(
                f"trainer.loss built a {type(custom).__name__}, which cannot be called; expected "
                "a loss called as loss(output, target), such as torch.nn.SmoothL1Loss"
            )
        self.kind, self.ignore_index, self.custom = kind, ignore_index, custom

    def terms(self, output: Any, targets: Tensor, labels_given: bool) -> LossTerms:
        """The loss of ``output`` (what the model returned) against ``targets``;
        ``labels_given``: the model was given the targets as ``labels``."""
        if self.custom is None and labels_given:
            own = model_computed_loss(output)
            if own is not None:
                return LossTerms(_scalar(own, "the model's loss"), None)
        prediction = model_prediction(output)
        _check_shapes(self.kind, prediction, targets)
        if self.kind == "cross_entropy":
            prediction, targets = prediction.flatten(0, -2), targets.flatten()
        if self.custom is not None:
            return LossTerms(_scalar(self.custom(prediction, targets), "trainer.loss"), None)
        if self.kind == "mse":
            summed = F.mse_loss(prediction.float(), targets.float(), reduction="sum")
            return LossTerms(summed, torch.tensor(targets.numel(), device=summed.device))
        if targets.is_floating_point():
            raise ValueError(
                f"the data's targets are {targets.dtype}, but loss cross_entropy takes class "
                "indices (an integer dtype); give int64 targets, or set trainer.loss"
            )
        summed = F.cross_entropy(
            prediction.float(), targets, ignore_index=self.ignore_index, reduction="sum"
        )
        return LossTerms(summed, (targets != self.ignore_index).sum())


def _scalar(loss: Any, what: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"{what} is {shape}, expected a scalar tensor (a loss reduced to its mean or sum)"
        )
    return loss.float()


def _check_shapes(kind: str, prediction: Tensor, targets: Tensor) -> None:
    output_shape, target_shape = tuple(prediction.shape), tuple(targets.shape)
    if kind == "mse" and output_shape != target_shape:
        hint = "reshape the model's output or the data's targets to one shape"
        if output_shape == (*target_shape, 1):
            hint = "return output.squeeze(-1) from the model, or give targets of the output's shape"
        raise ValueError(
            f"the model's output has shape {output_shape} but the targets {target_shape}: for "
            f"loss mse they must be equal (torch would broadcast them); {hint}"
        )
    if kind == "cross_entropy" and (prediction.dim() < 2 or output_shape[:-1] != target_shape):
        raise ValueError(
            f"the model's output has shape {output_shape} and the targets {target_shape}: for "
            "loss cross_entropy the output is logits (..., classes) for targets (...), so "
            "output.shape[:-1] must equal the targets' shape; make the model return "
            f"{(*target_shape, 'classes')} or reshape the data's targets"
        )


def global_count(terms: LossTerms, world_size: int) -> Tensor:
    """Collective where world_size > 1: the items counted on all ranks together."""
    count = terms.count.clone()
    if world_size > 1:
        dist.all_reduce(count)
    return count


def share_of_global_mean(terms: LossTerms, world_size: int, count: Tensor | None) -> Tensor:
    """What this rank back-propagates: averaged over ranks (as the reducer averages gradients),
    it is the global batch's loss (Note [loss averaging across ranks]). ``count``: the
    :func:`global_count` of a summed loss, None for a mean."""
    if terms.count is None:
        return terms.value
    # A global batch of padding only: no item counts, the loss and its gradient are 0.
    return terms.value * world_size / count.clamp(min=1)


def rank_loss(terms: LossTerms, world_size: int) -> Tensor:
    """Collective for a summed loss where world_size > 1: :func:`share_of_global_mean`."""
    count = None if terms.count is None else global_count(terms, world_size)
    return share_of_global_mean(terms, world_size, count)


class HeldOutTotal:
    """The held-out loss over batches and ranks: summed losses over the items they count,
    means weighted by the samples of their batch (Note [loss averaging across ranks])."""

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss, weight)

    def add(self, terms: LossTerms, samples: int) -> None:
        if terms.count is None:
            self.total[0] += terms.value.double() * samples
            self.total[1] += samples
        else:
            self.total[0] += terms.value.double()
            self.total[1] += terms.count

    def mean(self, world_size: int) -> float:
        """Collective where world_size > 1: the mean over every rank's batches."""
        total = self.total.clone()
        if world_size > 1:
            dist.all_reduce(total)
        if total[1] == 0:
            raise ValueError(
                "the held-out samples evaluated hold no target that counts (all equal "
                "trainer.ignore_index): give more of them (trainer.eval_samples) or check the data"
            )
        return (total[0] / total[1]).item()
