"""``load``: each rank reads and checks what it needs, then all apply it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import comm
from ..factored import factored_shapes, touched
from ..layout import Range
from ..optimizer import ShardedOptimizer
from ..state import ACCUMULATOR, OWNED_RANGE
from .collective import communicator, everywhere
from .directory import resolve
from .extra import decode_extra
from .format import CheckpointError, CheckpointInfo, Reader, read_manifest
from .names import check_same_names, param_names, params_of, preview


def load(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: ShardedOptimizer | None = None,
    process_group: object | None = None,
    strict: bool = True,
) -> CheckpointInfo:
    """Collective: restore ``model`` and ``optimizer`` from a checkpoint saved at any world
    size; ``path`` is a checkpoint or a directory of them (the highest step is taken).

    Each rank reads and checks (sizes, checksums, names, shapes) what it needs; only when
    every rank succeeded do the model and optimizer change (Note [agree before acting]). The
    optimizer takes the saved hyperparameters, counters and state, as ``load_state_dict``
    does; pass the model too, so that parameters are restored (each rank reads its own part).

    ``strict=False`` (the model only) is for fine-tuning from a checkpoint of another model,
    such as one with another head: the model's tensors whose names and shapes match the
    checkpoint's are loaded, the others are left as they are and listed in the returned
    ``missing_keys`` (not in the checkpoint), ``unexpected_keys`` (only in the checkpoint) and
    ``mismatched_keys`` (another shape there).
    """
    if model is None and optimizer is None:
        raise ValueError("load() needs model=, optimizer= or both")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    if not strict and optimizer is not None:
        raise ValueError(
            "load(strict=False) loads a model only: an optimizer over other parameters cannot "
            "take the saved state. Call load(path, model=model, strict=False) and build a fresh "
            "optimizer over the model afterwards"
        )
    channel = communicator(optimizer, process_group)
    directory = Path(
        everywhere(channel, lambda: str(resolve(Path(path))) if channel.rank == 0 else None)[0]
    )
    loaded: _Loaded | None = None

    def read() -> None:
        nonlocal loaded
        loaded = _Loaded.read(directory, model, optimizer, channel, strict)

    everywhere(channel, read)
    loaded.apply(model, optimizer)
    body = loaded.body
    return CheckpointInfo(
        directory,
        body["step"],
        body["world_size"],
        loaded.extra,
        missing_keys=loaded.missing_keys,
        unexpected_keys=loaded.unexpected_keys,
        mismatched_keys=loaded.mismatched_keys,
    )


@dataclasses.dataclass
class _Loaded:
    """Everything one rank restores, read and checked before anything changes."""

    body: dict[str, Any]
    param_pieces: list[tuple[Tensor, tuple[int, int], Tensor]]
    model_tensors: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None
    extra: dict[str, Any]
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    mismatched_keys: tuple[str, ...] = ()

    @classmethod
    def read(
        cls,
        directory: Path,
        model: torch.nn.Module | None,
        optimizer: ShardedOptimizer | None,
        channel: comm.Communicator,
        strict: bool,
    ) -> _Loaded:
        body = read_manifest(directory)
        with Reader(directory, body) as reader:
            loaded = cls(body, [], {}, None, decode_extra(body["extra"], reader))
            if model is not None:
                loaded._read_model(reader, model, optimizer, strict)
            if optimizer is not None:
                loaded.optimizer_state = _read_optimizer(reader, body, optimizer, model, channel)
                optimizer.check_state_dict(loaded.optimizer_state)
        return loaded

    def _read_model(
        self,
        reader: Reader,
        model: torch.nn.Module,
        optimizer: ShardedOptimizer | None,
        strict: bool,
    ) -> None:
        saved = self.body["model"]
        if saved is None:
            raise CheckpointError("the checkpoint holds no model (it was saved with model=None)")
        aliases = saved["aliases"]
        here = model.state_dict(keep_vars=True)
        saved_keys = set(saved["keys"]) | set(aliases)
        if strict:
            check_same_names("the model's state_dict keys", list(here), sorted(saved_keys))
        self.missing_keys = tuple(sorted(set(here) - saved_keys))
        self.unexpected_keys = tuple(sorted(saved_keys - set(here)))
        mismatched = []
        optimized = {id(p) for p in params_of(optimizer)}
        seen = set()
        for key, tensor in here.items():
            stored = f"model/{aliases.get(key, key)}"
            if key not in saved_keys:  # strict=False: a missing key
                continue
            if not strict and tuple(reader.tensors[stored]["shape"]) != tuple(tensor.shape):
                mismatched.append(key)
                continue
            _check_shape(reader, stored, key, tensor.shape)
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if id(tensor) not in optimized:
                self.model_tensors[key] = reader.read(stored).view(tensor.shape)
                continue
            # Only this rank's elements: the optimizer's load gathers the rest from their owners.
            owned = optimizer.owned_range(tensor)
            if owned is not None:
                self.param_pieces.append((tensor, owned, reader.read(stored, *owned)))
        self.mismatched_keys = tuple(sorted(mismatched))

    def apply(self, model: torch.nn.Module | None, optimizer: ShardedOptimizer | None) -> None:
        """Collective when sharded (the optimizer gathers the parameters)."""
        if optimizer is not None:
            optimizer.wait_for_params()
        with torch.no_grad():
            for tensor, (start, end), values in self.param_pieces:
                tensor.view(-1)[start:end].copy_(values)
        if model is not None and self.model_tensors:
            model.load_state_dict(self.model_tensors, strict=False)
        if optimizer is not None:
            optimizer.load_state_dict(self.optimizer_state)


def _read_optimizer(
    reader: Reader,
    body: dict[str, Any],
    optimizer: ShardedOptimizer,
    model: torch.nn.Module | None,
    channel: comm.Communicator,
) -> dict[str, Any]:
    """The optimizer's state_dict for this rank: its own shard, by parameter name."""
    saved = body["optimizer"]
    if saved is None:
        raise CheckpointError(
            "the checkpoint holds no optimizer (it was saved with optimizer=None)"
        )
    names = param_names(optimizer, model)
    check_same_names("the optimizer's parameters", names, saved["param_names"])
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(saved_groups)} param groups but this one "
            f"has {len(optimizer.param_groups)}"
        )
    index_of = {name: i for i, name in enumerate(names)}
    groups, first = [], 0
    for g, (group, saved_group) in enumerate(zip(optimizer.param_groups, saved_groups)):
        here = names[first : first + len(group["params"])]
        first += len(group["params"])
        if sorted(here) != sorted(saved_group["params"]):
            raise CheckpointError(
                f"param group {g} holds {preview(here)} here but {preview(saved_group['params'])}"
                " in the checkpoint"
            )
        groups.append({**saved_group, "params": [index_of[n] for n in saved_group["params"]]})
    counters = saved["state"]
    prefix = counters["name"]
    params = params_of(optimizer)
    # The sharded kinds the checkpoint holds ("optimizer/<kind>/<parameter name>"): the
    # rule's slots, the EMA, the masters.
    kinds = sorted(
        {key.split("/", 2)[1] for key in body["tensors"] if key.startswith("optimizer/")}
    )
    factored_kinds = getattr(optimizer.RULE, "FACTORED_SLOTS", ())
    state: dict[int, dict[str, Any]] = {}
    for i, (name, p) in enumerate(zip(names, params)):
        owned = optimizer.owned_range(p)
        entry: dict[str, Any] = {}
        if owned is not None:
            entry[f"{prefix}/{OWNED_RANGE}"] = owned
            for kind in kinds:
                key = f"optimizer/{kind}/{name}"
                if key not in body["tensors"]:
                    continue
                if kind in factored_kinds:  # the rows or columns this rank's elements touch
                    _check_shape(reader, key, name, factored_shapes(tuple(p.shape))[kind])
                    held = touched(tuple(p.shape), Range(*owned))[kind]
                    entry[f"{prefix}/{kind}"] = reader.read(key, held.start, held.end)
                    continue
                _check_shape(reader, key, name, p.shape)
                entry[f"{prefix}/{kind}"] = reader.read(key, *owned)
        sums = _read_accumulator(reader, saved["accumulator_ranks"], name, p, channel)
        if sums is not None:
            entry[f"{prefix}/{ACCUMULATOR}"] = sums
        state[i] = entry
    shardadam = {
        **counters,
        "weight_decay_excluded": [index_of[n] for n in counters["weight_decay_excluded"]],
    }
    return {"state": state, "param_groups": groups, "shardadam": shardadam}


def _read_accumulator(
    reader: Reader, saved_ranks: int, name: str, param: Tensor, channel: comm.Communicator
) -> Tensor | None:
    """This rank's local gradient sums within an accumulation cycle: its own at the same world
    size, else the mean of the saved ranks' (what the reduction at the boundary averages)."""
    if not saved_ranks:
        return None
    ranks = [channel.rank] if saved_ranks == channel.world_size else range(saved_ranks)
    keys = [f"accumulator/{rank}/{name}" for rank in ranks]
    for key in keys:
        _check_shape(reader, key, name, param.shape)
    if len(keys) == 1:
        return reader.read(keys[0]).view(param.shape)
    return (sum(reader.read(key) for key in keys) / len(keys)).view(param.shape)


def _check_shape(reader: Reader, key: str, name: str, shape: torch.Size) -> None:
    meta = reader.tensors.get(key)
    if meta is None:
        raise CheckpointError(f"the checkpoint has no {key!r}")
    if tuple(meta["shape"]) != tuple(shape):
        raise CheckpointError(
            f"{name!r} has shape {tuple(shape)} here but {tuple(meta['shape'])} in the "
            f"checkpoint ({key!r})"
        )
