"""The optimizer's parameters by name, and comparing names with a checkpoint's."""

from __future__ import annotations

import torch
from torch import Tensor

from ..optimizer import ShardedOptimizer
from .format import CheckpointError


def param_names(optimizer: ShardedOptimizer, model: torch.nn.Module | None) -> list[str]:
    """The optimizer's parameters by name, in optimizer order: the model's names where a model
    is given, else the optimizer's own (``ShardedAdam.param_names``)."""
    names = optimizer.param_names()
    if model is not None:
        in_model = {id(p): name for name, p in model.named_parameters()}
        params = params_of(optimizer)
        names = [in_model.get(id(p), own) for p, own in zip(params, names)]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the optimizer's parameters have names used twice: {twice}")
    return names


def params_of(optimizer: ShardedOptimizer | None) -> list[Tensor]:
    """The optimizer's parameters in its order (the indices of its state_dict); none without."""
    return [] if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]


def check_same_names(what: str, here: list[str], saved: list[str]) -> None:
    missing, unexpected = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
    if missing or unexpected:
        raise CheckpointError(
            f"{what} differ from the checkpoint's: not in the checkpoint: {preview(missing)}; "
            f"only in the checkpoint: {preview(unexpected)}"
        )


def preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]" if names else "none"
