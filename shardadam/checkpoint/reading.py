"""A checkpoint read in one process, without a model or an optimizer: ``read_weights`` (the
model's weights or their EMA as a plain state dict, which ``shardadam.export`` writes out) and
``read_extra``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ..state import AVERAGE
from .directory import resolve
from .extra import decode_extra
from .format import CheckpointError, Reader, read_manifest


def read_weights(path: str | os.PathLike, *, ema: bool = False) -> dict[str, Tensor]:
    """The model's ``state_dict`` saved in the checkpoint at ``path`` (a checkpoint or a root:
    the highest step), keyed as the model's, each key its own CPU tensor (tied weights too).

    ``ema=True`` puts the EMA (``optimizer/average/<param>``) in place of every parameter the
    optimizer kept one of, in the parameter's dtype, as ``ShardedAdam.swap_moving_averages``
    does; buffers and frozen parameters keep their values. Every chunk read is checked (sizes,
    checksums). Not a collective: any one process can call it, at any world size.
    """
    if not isinstance(ema, bool):
        raise TypeError(f"ema must be True or False, got {ema!r}")
    directory = resolve(Path(path))
    body = read_manifest(directory)
    saved = body["model"]
    if saved is None:
        raise CheckpointError(f"{directory} holds no model weights (it was saved with model=None)")
    if ema and not any(key.startswith(f"optimizer/{AVERAGE}/") for key in body["tensors"]):
        raise CheckpointError(
            f"{directory} holds no EMA of the weights: it was saved without an optimizer with "
            "use_ema=True; export the weights themselves (without ema)"
        )
    with Reader(directory, body) as reader:
        weights = {key: _read_weight(reader, key, ema) for key in saved["keys"]}
    for key, first in saved["aliases"].items():
        weights[key] = weights[first].clone()  # tied: each key its own tensor
    return weights


def read_extra(path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` saved in the checkpoint at ``path`` (a checkpoint or a root: the highest
    step), as ``load`` returns it, without loading anything. Not a collective."""
    directory = resolve(Path(path))
    body = read_manifest(directory)
    with Reader(directory, body) as reader:
        return decode_extra(body["extra"], reader)


def _read_weight(reader: Reader, key: str, ema: bool) -> Tensor:
    stored, average = f"model/{key}", f"optimizer/{AVERAGE}/{key}"
    # The optimizer's names are the model's (checkpoint.names.param_names), and a tensor's
    # first state_dict key, which the checkpoint stores it under, is its named_parameters name.
    source = average if ema and average in reader.tensors else stored
    values = reader.read(source).view(reader.tensors[stored]["shape"])
    return values.to(reader.dtype(stored))
