"""``save``: what each rank writes, and the manifest rank 0 publishes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import comm
from ..factored import factored_shapes, owned, touched
from ..layout import Range
from ..optimizer import ShardedOptimizer
from ..state import ACCUMULATOR, OWNED_RANGE
from . import fs
from .collective import communicator, everywhere
from .directory import publish, start_partial
from .extra import encode_extra
from .format import FORMAT, MANIFEST, VERSION, json_crc, json_value, raw_bytes
from .names import param_names, params_of


def save(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: ShardedOptimizer | None = None,
    step: int | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    process_group: object | None = None,
) -> Path:
    """Collective: save ``model`` and ``optimizer`` as ``<path>/step-<step>``; returns it.

    Every rank writes its own file in parallel; the checkpoint appears (atomically) only once
    all are written and flushed (Note [atomic publication]). ``step`` defaults to
    ``optimizer.iterations``. ``extra`` (rank 0's) is a dict of JSON values, tuples, tensors
    and numpy arrays (RNG states: Note [extra's encoding]), returned by ``load`` as it was
    given. ``keep_last=K`` then removes all but the K checkpoints with the highest steps
    (never the one just saved); None keeps all. A save at a step that was already saved
    replaces it, the old copy staying loadable until the new one is complete (Note [re-saving
    a step]). The directory must be one every rank sees.
    """
    channel = communicator(optimizer, process_group)
    root = Path(path)
    plan: _SavePlan | None = None

    def build_plan() -> None:
        nonlocal plan
        plan = _SavePlan.build(model, optimizer, step, extra, keep_last, channel)

    everywhere(channel, build_plan)
    partial = Path(
        everywhere(
            channel, lambda: str(start_partial(root, plan.step)) if channel.rank == 0 else None
        )[0]
    )
    try:
        indices = everywhere(channel, lambda: plan.write(partial, channel.rank))
        published_at = everywhere(
            channel,
            lambda: str(_publish(root, partial, plan, indices)) if channel.rank == 0 else None,
        )[0]
    except BaseException:
        if channel.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return Path(published_at)


@dataclasses.dataclass
class _Record:
    """One chunk this rank writes: elements [start, start + numel) of tensor ``key``."""

    key: str
    start: int
    values: Tensor


@dataclasses.dataclass
class _SavePlan:
    """What one rank writes, and (on every rank) the manifest's description of the tensors."""

    step: int
    keep_last: int | None
    world_size: int
    tensors: dict[str, dict[str, Any]]
    """key -> {"shape", "dtype"} of every tensor this rank knows of."""
    records: list[_Record]
    meta: dict[str, Any]
    """The manifest's "model", "optimizer" and "extra" entries (used from rank 0)."""

    @classmethod
    def build(
        cls,
        model: torch.nn.Module | None,
        optimizer: ShardedOptimizer | None,
        step: int | None,
        extra: dict[str, Any] | None,
        keep_last: int | None,
        channel: comm.Communicator,
    ) -> _SavePlan:
        if model is None and optimizer is None:
            raise ValueError("save() needs model=, optimizer= or both")
        step = _check_step(optimizer.iterations if step is None and optimizer else step)
        if keep_last is not None and (
            isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        ):
            raise ValueError(f"Invalid keep_last: {keep_last!r} (expected an int >= 1 or None)")
        if extra is not None and not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
        if optimizer is not None:
            optimizer.wait_for_params()  # the records are read when written
        plan = cls(step, keep_last, channel.world_size, {}, [], {})
        names = param_names(optimizer, model) if optimizer is not None else []
        plan.meta["model"] = None if model is None else plan._add_model(model, optimizer, channel)
        plan.meta["optimizer"] = (
            None if optimizer is None else plan._add_optimizer(optimizer, names, channel)
        )
        extra_tensors: dict[str, Tensor] = {}
        plan.meta["extra"] = encode_extra(extra or {}, "extra", extra_tensors)
        for key, tensor in extra_tensors.items():
            plan._describe(key, tensor.shape, tensor.dtype)
            if channel.rank == 0:
                plan.records.append(_Record(key, 0, tensor.detach().reshape(-1)))
        return plan

    def _describe(self, key: str, shape: Any, dtype: torch.dtype) -> None:
        self.tensors[key] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}

    def _add_model(
        self, model: torch.nn.Module, optimizer: ShardedOptimizer | None, channel: comm.Communicator
    ) -> dict[str, Any]:
        """The model's tensors: the elements of optimized parameters this rank owns (its
        optimizer shard); every other tensor whole, from rank 0 (Note [tensors from rank 0])."""
        optimized = {id(p) for p in params_of(optimizer)}
        first_key: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for key, tensor in model.state_dict(keep_vars=True).items():
            if not isinstance(tensor, Tensor):
                raise TypeError(
                    f"model.state_dict() entry {key!r} is a {type(tensor).__name__}; "
                    "checkpoints hold the model's tensors only"
                )
            if id(tensor) in first_key:  # tied weights are stored once
                aliases[key] = first_key[id(tensor)]
                continue
            first_key[id(tensor)] = key
            self._describe(f"model/{key}", tensor.shape, tensor.dtype)
            flat = tensor.detach().reshape(-1)
            if id(tensor) in optimized:
                owned = optimizer.owned_range(tensor)
            else:
                owned = (0, flat.numel()) if channel.rank == 0 else None
            if owned is not None and owned[1] > owned[0]:
                self.records.append(_Record(f"model/{key}", owned[0], flat[owned[0] : owned[1]]))
        return {"keys": list(first_key.values()), "aliases": aliases}

    def _add_optimizer(
        self, optimizer: ShardedOptimizer, names: list[str], channel: comm.Communicator
    ) -> dict[str, Any]:
        """This rank's shard of the optimizer state, by parameter name; the local gradient
        sums when saved within an accumulation cycle."""
        state_dict = optimizer.state_dict()
        extra = state_dict["shardadam"]
        prefix = extra["name"]
        params = params_of(optimizer)
        steps = optimizer.options.gradient_accumulation_steps
        mid_cycle = bool(steps) and extra["micro_steps"] % steps != 0
        factored_kinds = getattr(optimizer.RULE, "FACTORED_SLOTS", ())
        for i, entry in state_dict["state"].items():
            owned_range = entry.get(f"{prefix}/{OWNED_RANGE}", (0, params[i].numel()))
            for entry_key, values in entry.items():
                kind = entry_key.removeprefix(f"{prefix}/")
                if kind in (OWNED_RANGE, ACCUMULATOR):
                    continue  # sharded state only: the rule's slots, the EMA, the master
                key = f"optimizer/{kind}/{names[i]}"
                if kind in factored_kinds:
                    self._add_factored(key, kind, params[i].shape, owned_range, values)
                    continue
                self._describe(key, params[i].shape, values.dtype)
                self.records.append(_Record(key, owned_range[0], values.detach().reshape(-1)))
        for rank in range(channel.world_size if mid_cycle else 0):
            for i, p in enumerate(params):
                key = f"accumulator/{rank}/{names[i]}"
                self._describe(key, p.shape, p.dtype)
                if rank == channel.rank:
                    # The state_dict holds sums only where this rank accumulated a gradient.
                    sums = state_dict["state"][i].get(f"{prefix}/{ACCUMULATOR}")
                    sums = torch.zeros_like(p) if sums is None else sums.detach()
                    self.records.append(_Record(key, 0, sums.reshape(-1)))
        by_index = dict(enumerate(names))
        groups = []
        for g, group in enumerate(state_dict["param_groups"]):
            saved = {
                key: json_value(value, f"param group {g} {key!r}")
                for key, value in group.items()
                if key not in ("params", "param_names")
            }
            saved["params"] = [by_index[i] for i in group["params"]]
            groups.append(saved)
        counters = {
            **{key: json_value(value, key) for key, value in extra.items()},
            "weight_decay_excluded": [by_index[i] for i in extra["weight_decay_excluded"]],
        }
        return {
            "param_names": names,
            "param_groups": groups,
            "state": counters,
            "accumulator_ranks": channel.world_size if mid_cycle else 0,
        }

    def _add_factored(
        self, key: str, kind: str, shape: Any, owned_range: tuple[int, int], values: Tensor
    ) -> None:
        """A factored rule's rows or columns (Note [factored state] in ``factored``): this rank
        holds those its elements touch and writes those whose first element it holds, so that
        each entry is in one rank's file."""
        elements = Range(*owned_range)
        held, mine = touched(shape, elements)[kind], owned(shape, elements)[kind]
        self._describe(key, factored_shapes(shape)[kind], values.dtype)
        flat = values.detach().reshape(-1)
        if mine.numel > 0:
            start = mine.start - held.start
            self.records.append(_Record(key, mine.start, flat[start : start + mine.numel]))

    def write(self, partial: Path, rank: int) -> dict[str, Any]:
        """Write this rank's file (fsync'ed); returns its part of the manifest."""
        name = f"rank-{rank:05d}.bin"
        chunks: dict[str, list[dict[str, Any]]] = {}
        offset = 0
        with fs.create(partial / name) as file:
            for record in self.records:
                raw = raw_bytes(record.values)
                fs.write(file, raw)
                chunks.setdefault(record.key, []).append(
                    {
                        "file": name,
                        "start": record.start,
                        "end": record.start + record.values.numel(),
                        "offset": offset,
                        "crc32": zlib.crc32(raw),
                    }
                )
                offset += raw.nbytes
            fs.fsync(file)
        return {"file": name, "nbytes": offset, "tensors": self.tensors, "chunks": chunks}


def _check_step(step: Any) -> int:
    if step is None:
        raise ValueError("save() needs step= (or an optimizer, whose iterations it takes)")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"Invalid step: {step!r} (expected an int >= 0)")
    return step


def _publish(root: Path, partial: Path, plan: _SavePlan, indices: list[dict[str, Any]]) -> Path:
    """Rank 0, once every rank has written: check the files, write the manifest and publish
    (Note [atomic publication])."""
    tensors: dict[str, dict[str, Any]] = {}
    files = {}
    for index in indices:
        written = partial / index["file"]
        size = written.stat().st_size if written.exists() else None
        if size != index["nbytes"]:
            raise RuntimeError(
                f"rank file {written} holds {size} bytes but its rank wrote {index['nbytes']}; "
                "the checkpoint directory must be one every rank sees (a shared file system)"
            )
        files[index["file"]] = index["nbytes"]
        for key, description in index["tensors"].items():
            tensors.setdefault(key, {**description, "chunks": []})
        for key, chunks in index["chunks"].items():
            tensors[key]["chunks"].extend(chunks)
    body = {
        "format": FORMAT,
        "version": VERSION,
        "step": plan.step,
        "world_size": plan.world_size,
        "files": files,
        "tensors": tensors,
        **plan.meta,
    }
    document = json.dumps({"body": body, "crc32": json_crc(body)}, indent=1, sort_keys=True)
    with fs.create(partial / MANIFEST) as file:
        fs.write(file, document.encode())
        fs.fsync(file)
    fs.fsync_dir(partial)
    return publish(root, partial, plan.step, plan.keep_last)
