"""Sharded checkpoints: every rank writes and reads its own part, and any world size loads them.

A checkpoint is a directory ``<root>/step-<step, 8 digits>/`` holding

    rank-<r, 5 digits>.bin   raw tensor bytes written by rank r, one record after another
    manifest.json            written last, by rank 0

Tensors are flattened and cut into chunks; a chunk is elements [start, end) of one tensor, and
the manifest records for every tensor its shape and dtype and for every chunk its file, byte
offset and CRC-32, together with the optimizer's hyperparameters, counters and weight-decay
exclusions, the step, and the caller's ``extra``. Tensor names say what they hold, by parameter
name (never by position in a flat buffer): ``model/<key>`` (the model's ``state_dict`` keys),
``optimizer/<kind>/<parameter>`` (``momentum``, ``velocity``, ``velocity_hat``, ``average``,
``master``), ``accumulator/<rank>/<parameter>`` (mid-accumulation only) and ``extra/<path>``.

Each rank writes what it owns: its shard of the optimizer state and the same elements of the
optimized parameters; rank 0 writes every other model tensor (Note [tensors from rank 0]) and
``extra``. A loading rank reads the elements its own shard needs, from whichever chunks hold
them, so a checkpoint written at one world size, bucket size or stage loads at any other.
Nothing is pickled: a checkpoint is JSON and raw numbers and cannot hold code.

Note [atomic publication]
    A save writes into ``<root>/.partial-step-<step>-<random>/``. Once every rank has written
    and fsync'ed its file, rank 0 checks the files, writes and fsyncs the manifest and renames
    the directory to ``step-<step>`` (one atomic rename). A checkpoint is published iff its
    ``step-`` directory holds a manifest, and it exists only complete; a killed save leaves a
    hidden ``.partial-`` directory that loading never looks at and the next save removes.
    Removal (``keep_last``, or the old copy of a re-saved step) renames a checkpoint out of
    sight (``.removing-``) before deleting it.

Note [re-saving a step]
    A directory cannot be renamed over another that is not empty, and deleting the old copy of
    a step before publishing the new one leaves a moment with neither. So a save of a step that
    exists publishes its complete copy as ``step-<step>.new`` (one rename), renames the old
    ``step-<step>`` aside to ``.removing-...`` (one rename), renames ``step-<step>.new`` to
    ``step-<step>`` (one rename) and deletes the old copy, fsyncing the root between renames so
    that they reach the disk in this order. ``published``, ``latest`` and ``load`` take
    ``step-<step>.new`` for the step while it exists (it is always complete), so at every
    instant the step has a loadable copy: the old until the first rename, the new from then on.
    A crash between the renames leaves ``step-<step>.new``; the next save finishes the swap
    before it starts (rank 0), so ``keep_last`` and later saves see one copy per step.
    Every file-system operation of a save is one call through a seam a test can stop
    (Note [crash points]); tests/unit/test_checkpoint_crash.py stops a re-save before each.

Note [tensors from rank 0]
    A model tensor the optimizer does not update (buffers such as BatchNorm's running
    statistics and batch counter, frozen parameters, and every tensor of a save without an
    optimizer) is saved whole from rank 0, and every loading rank gets rank 0's values. Such
    tensors may differ between ranks (nothing synchronises buffers); cutting them across the
    saving ranks would stitch one tensor together from several ranks' values, a state no rank
    ever had.

Note [agree before acting]
    Any rank can fail alone (a disk error, a chunk whose checksum fails on the rank that reads
    it). Each phase of a save or load runs on every rank, then the ranks exchange whether it
    succeeded, and all raise the same error if one failed. So no rank waits in a collective
    that another left, and a load changes the model and optimizer only after every rank has
    read and checked all it needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import uuid
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import comm
from .optimizer import ACCUMULATOR, OWNED_RANGE, SHARDED_KINDS, ShardedAdam

FORMAT = "shardadam.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_NEW_SUFFIX = ".new"
_NEW_COPY = re.compile(r"step-(\d+)\.new")
_RANK_FILE = re.compile(r"rank-(\d{5})\.bin")
_HIDDEN_PREFIXES = (".partial-", ".removing-")
_TENSOR_REF = "__shardadam_tensor__"
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: incomplete, corrupt, or for another model."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What ``load`` restored."""

    path: Path
    step: int
    world_size: int
    """The world size the checkpoint was saved at."""
    extra: dict[str, Any]


# ---------------------------------------------------------------------- finding checkpoints


def checkpoint_path(root: str | os.PathLike, step: int) -> Path:
    """Where ``save(root, step=step)`` publishes."""
    return Path(root) / f"step-{step:08d}"


def published(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """The published checkpoints under ``root`` as (step, path), oldest step first; one path
    per step, the new copy while a re-save swaps it in (Note [re-saving a step])."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((step, copies[0]) for step, copies in _copies(root).items())


def _copies(root: Path) -> dict[int, list[Path]]:
    """The complete copies of each step under ``root``: ``step-<N>.new`` (a re-save's new copy),
    then ``step-<N>``, those that hold a manifest."""
    names: dict[int, str] = {}
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name) or _NEW_COPY.fullmatch(entry.name)
        if match:
            names[int(match.group(1))] = f"step-{match.group(1)}"
    found = {}
    for step, name in names.items():
        copies = [root / f"{name}{_NEW_SUFFIX}", root / name]
        copies = [path for path in copies if (path / MANIFEST).is_file()]
        if copies:
            found[step] = copies
    return found


def latest(root: str | os.PathLike) -> Path | None:
    """The published checkpoint with the highest step under ``root``, or None."""
    found = published(root)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------- saving


def save(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: ShardedAdam | None = None,
    step: int | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    process_group: object | None = None,
) -> Path:
    """Collective: save ``model`` and ``optimizer`` as ``<path>/step-<step>``; returns it.

    Every rank writes its own file in parallel; the checkpoint appears (atomically) only once
    all are written and flushed (Note [atomic publication]). ``step`` defaults to
    ``optimizer.iterations``. ``extra`` (rank 0's) is a dict of JSON values and tensors,
    returned by ``load``; tuples come back as lists. ``keep_last=K`` then removes all but the
    K checkpoints with the highest steps (never the one just saved); None keeps all. A save at
    a step that was already saved replaces it, the old copy staying loadable until the new one
    is complete (Note [re-saving a step]). The directory must be one every rank sees.
    """
    channel = _communicator(optimizer, process_group)
    root = Path(path)
    plan: _SavePlan | None = None

    def build_plan() -> None:
        nonlocal plan
        plan = _SavePlan.build(model, optimizer, step, extra, keep_last, channel)

    _everywhere(channel, build_plan)
    partial = Path(
        _everywhere(
            channel, lambda: str(_start_partial(root, plan.step)) if channel.rank == 0 else None
        )[0]
    )
    try:
        indices = _everywhere(channel, lambda: plan.write(partial, channel.rank))
        published_at = _everywhere(
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
        optimizer: ShardedAdam | None,
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
        names = _param_names(optimizer, model) if optimizer is not None else []
        plan.meta["model"] = None if model is None else plan._add_model(model, optimizer, channel)
        plan.meta["optimizer"] = (
            None if optimizer is None else plan._add_optimizer(optimizer, names, channel)
        )
        extra_tensors: dict[str, Tensor] = {}
        plan.meta["extra"] = _encode_extra(extra or {}, "extra", extra_tensors)
        for key, tensor in extra_tensors.items():
            plan._describe(key, tensor.shape, tensor.dtype)
            if channel.rank == 0:
                plan.records.append(_Record(key, 0, tensor.detach().reshape(-1)))
        return plan

    def _describe(self, key: str, shape: Any, dtype: torch.dtype) -> None:
        self.tensors[key] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}

    def _add_model(
        self, model: torch.nn.Module, optimizer: ShardedAdam | None, channel: comm.Communicator
    ) -> dict[str, Any]:
        """The model's tensors: the elements of optimized parameters this rank owns (its
        optimizer shard); every other tensor whole, from rank 0 (Note [tensors from rank 0])."""
        optimized = {id(p) for p in _params_of(optimizer)}
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
        self, optimizer: ShardedAdam, names: list[str], channel: comm.Communicator
    ) -> dict[str, Any]:
        """This rank's shard of the optimizer state, by parameter name; the local gradient
        sums when saved within an accumulation cycle."""
        state_dict = optimizer.state_dict()
        extra = state_dict["shardadam"]
        prefix = extra["name"]
        params = _params_of(optimizer)
        steps = optimizer.options.gradient_accumulation_steps
        mid_cycle = bool(steps) and extra["micro_steps"] % steps != 0
        for i, entry in state_dict["state"].items():
            owned = entry.get(f"{prefix}/{OWNED_RANGE}", (0, params[i].numel()))
            for kind in SHARDED_KINDS:
                values = entry.get(f"{prefix}/{kind}")
                if values is None:
                    continue
                key = f"optimizer/{kind}/{names[i]}"
                self._describe(key, params[i].shape, values.dtype)
                self.records.append(_Record(key, owned[0], values.detach().reshape(-1)))
        for rank in range(channel.world_size if mid_cycle else 0):
            for i, p in enumerate(params):
                key = f"accumulator/{rank}/{names[i]}"
                self._describe(key, p.shape, p.dtype)
                if rank == channel.rank:
                    sums = state_dict["state"][i][f"{prefix}/{ACCUMULATOR}"]
                    self.records.append(_Record(key, 0, sums.detach().reshape(-1)))
        by_index = dict(enumerate(names))
        groups = []
        for g, group in enumerate(state_dict["param_groups"]):
            saved = {
                key: _json_value(value, f"param group {g} {key!r}")
                for key, value in group.items()
                if key not in ("params", "param_names")
            }
            saved["params"] = [by_index[i] for i in group["params"]]
            groups.append(saved)
        counters = {
            **{key: _json_value(value, key) for key, value in extra.items()},
            "weight_decay_excluded": [by_index[i] for i in extra["weight_decay_excluded"]],
        }
        return {
            "param_names": names,
            "param_groups": groups,
            "state": counters,
            "accumulator_ranks": channel.world_size if mid_cycle else 0,
        }

    def write(self, partial: Path, rank: int) -> dict[str, Any]:
        """Write this rank's file (fsync'ed); returns its part of the manifest."""
        name = f"rank-{rank:05d}.bin"
        chunks: dict[str, list[dict[str, Any]]] = {}
        offset = 0
        with _create(partial / name) as file:
            for record in self.records:
                raw = _raw_bytes(record.values)
                _write(file, raw)
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
            _fsync(file)
        return {"file": name, "nbytes": offset, "tensors": self.tensors, "chunks": chunks}


def _start_partial(root: Path, step: int) -> Path:
    """Rank 0: make the save's hidden directory, after finishing what killed saves left
    (Note [re-saving a step]) and removing their hidden directories."""
    _make_dir(root, exist_ok=True)
    if not os.access(root, os.W_OK):
        raise PermissionError(f"checkpoint directory {root} is not writable")
    _finish_swaps(root)
    for entry in root.iterdir():
        if entry.name.startswith(_HIDDEN_PREFIXES):
            _remove_tree(entry)
    partial = root / f".partial-step-{step:08d}-{uuid.uuid4().hex[:12]}"
    _make_dir(partial)
    return partial


def _publish(root: Path, partial: Path, plan: _SavePlan, indices: list[dict[str, Any]]) -> Path:
    """Rank 0, once every rank has written: Note [atomic publication]."""
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
    document = json.dumps({"body": body, "crc32": _json_crc(body)}, indent=1, sort_keys=True)
    with _create(partial / MANIFEST) as file:
        _write(file, document.encode())
        _fsync(file)
    _fsync_dir(partial)
    target = checkpoint_path(root, plan.step)
    if target.exists():
        new = target.with_name(target.name + _NEW_SUFFIX)
        _rename(partial, new)
        _fsync_dir(root)
        _swap_in(new, target)
    else:
        _rename(partial, target)
        _fsync_dir(root)
    _prune(root, plan.keep_last, plan.step, target)
    return target


def _swap_in(new: Path, target: Path) -> None:
    """Replace ``target`` by the complete copy ``new``: Note [re-saving a step]."""
    hidden = None
    if target.exists():
        hidden = _hidden_name(target)
        _rename(target, hidden)
        _fsync_dir(target.parent)
    _rename(new, target)
    _fsync_dir(target.parent)
    if hidden is not None:
        _remove_tree(hidden)


def _finish_swaps(root: Path) -> None:
    """Rank 0: finish the re-saves a crash interrupted, so that ``step-<N>.new`` is never left
    over (Note [re-saving a step])."""
    for entry in sorted(root.iterdir()):
        match = _NEW_COPY.fullmatch(entry.name)
        if match is None:
            continue
        if (entry / MANIFEST).is_file():
            _swap_in(entry, root / f"step-{match.group(1)}")
        else:  # never published: a save renames a copy to .new only once it is complete
            _remove(entry)


def _prune(root: Path, keep_last: int | None, saved_step: int, just_saved: Path) -> None:
    found = published(root)
    newer = [step for step, _ in found if step > saved_step]
    if newer:
        warnings.warn(
            f"saved {just_saved.name}, but {root} also holds checkpoints of later steps "
            f"{newer}; load({str(root)!r}) picks the highest step",
            RuntimeWarning,
            stacklevel=3,
        )
    if keep_last is None:
        return
    kept = {step for step, _ in found[-keep_last:]} | {saved_step}
    for step, copies in _copies(root).items():
        for path in copies if step not in kept else []:
            try:
                _remove(path)
            except OSError as error:
                warnings.warn(f"could not remove old checkpoint {path}: {error}", stacklevel=3)


def _remove(path: Path) -> None:
    """Unpublish (one rename), then delete."""
    hidden = _hidden_name(path)
    _rename(path, hidden)
    _remove_tree(hidden)


def _hidden_name(path: Path) -> Path:
    """Where a checkpoint goes out of sight before it is deleted."""
    return path.with_name(f".removing-{path.name}-{uuid.uuid4().hex[:12]}")


# ---------------------------------------------------------------------- loading


def load(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: ShardedAdam | None = None,
    process_group: object | None = None,
) -> CheckpointInfo:
    """Collective: restore ``model`` and ``optimizer`` from a checkpoint saved at any world
    size; ``path`` is a checkpoint or a directory of them (the highest step is taken).

    Each rank reads and checks (sizes, checksums, names, shapes) what it needs; only when
    every rank succeeded do the model and optimizer change (Note [agree before acting]). The
    optimizer takes the saved hyperparameters, counters and state, as ``load_state_dict``
    does; pass the model too, so that parameters are restored (each rank reads its own part).
    """
    if model is None and optimizer is None:
        raise ValueError("load() needs model=, optimizer= or both")
    channel = _communicator(optimizer, process_group)
    directory = Path(
        _everywhere(channel, lambda: str(_resolve(Path(path))) if channel.rank == 0 else None)[0]
    )
    loaded: _Loaded | None = None

    def read() -> None:
        nonlocal loaded
        loaded = _Loaded.read(directory, model, optimizer, channel)

    _everywhere(channel, read)
    loaded.apply(model, optimizer)
    body = loaded.body
    return CheckpointInfo(directory, body["step"], body["world_size"], loaded.extra)


def _resolve(path: Path) -> Path:
    if (path / MANIFEST).is_file():
        return path
    new = path.with_name(path.name + _NEW_SUFFIX)
    if _STEP_DIR.fullmatch(path.name) and (new / MANIFEST).is_file():
        return new  # mid-swap: Note [re-saving a step]
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
    found = latest(path)
    if found is not None:
        return found
    if (
        _STEP_DIR.fullmatch(path.name)
        or _NEW_COPY.fullmatch(path.name)
        or path.name.startswith(_HIDDEN_PREFIXES)
    ):
        raise CheckpointError(
            f"{path} has no {MANIFEST}: it is not a published checkpoint (a save that was "
            "interrupted publishes nothing)"
        )
    raise FileNotFoundError(f"no checkpoint in {path}: it holds no published step-<N> directory")


@dataclasses.dataclass
class _Loaded:
    """Everything one rank restores, read and checked before anything changes."""

    body: dict[str, Any]
    param_pieces: list[tuple[Tensor, tuple[int, int], Tensor]]
    model_tensors: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None
    extra: dict[str, Any]

    @classmethod
    def read(
        cls,
        directory: Path,
        model: torch.nn.Module | None,
        optimizer: ShardedAdam | None,
        channel: comm.Communicator,
    ) -> _Loaded:
        body = _read_manifest(directory)
        with _Reader(directory, body) as reader:
            loaded = cls(body, [], {}, None, _decode_extra(body["extra"], reader))
            if model is not None:
                loaded._read_model(reader, model, optimizer)
            if optimizer is not None:
                loaded.optimizer_state = _read_optimizer(reader, body, optimizer, model, channel)
                optimizer.check_state_dict(loaded.optimizer_state)
        return loaded

    def _read_model(
        self, reader: _Reader, model: torch.nn.Module, optimizer: ShardedAdam | None
    ) -> None:
        saved = self.body["model"]
        if saved is None:
            raise CheckpointError("the checkpoint holds no model (it was saved with model=None)")
        aliases = saved["aliases"]
        here = model.state_dict(keep_vars=True)
        _check_same_names("the model's state_dict keys", list(here), saved["keys"] + list(aliases))
        optimized = {id(p) for p in _params_of(optimizer)}
        seen = set()
        for key, tensor in here.items():
            stored = f"model/{aliases.get(key, key)}"
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

    def apply(self, model: torch.nn.Module | None, optimizer: ShardedAdam | None) -> None:
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
    reader: _Reader,
    body: dict[str, Any],
    optimizer: ShardedAdam,
    model: torch.nn.Module | None,
    channel: comm.Communicator,
) -> dict[str, Any]:
    """The optimizer's state_dict for this rank: its own shard, by parameter name."""
    saved = body["optimizer"]
    if saved is None:
        raise CheckpointError(
            "the checkpoint holds no optimizer (it was saved with optimizer=None)"
        )
    names = _param_names(optimizer, model)
    _check_same_names("the optimizer's parameters", names, saved["param_names"])
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
                f"param group {g} holds {_preview(here)} here but {_preview(saved_group['params'])}"
                " in the checkpoint"
            )
        groups.append({**saved_group, "params": [index_of[n] for n in saved_group["params"]]})
    counters = saved["state"]
    prefix = counters["name"]
    params = _params_of(optimizer)
    state: dict[int, dict[str, Any]] = {}
    for i, (name, p) in enumerate(zip(names, params)):
        owned = optimizer.owned_range(p)
        entry: dict[str, Any] = {}
        if owned is not None:
            entry[f"{prefix}/{OWNED_RANGE}"] = owned
            for kind in SHARDED_KINDS:
                key = f"optimizer/{kind}/{name}"
                if key in body["tensors"]:
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
    reader: _Reader, saved_ranks: int, name: str, param: Tensor, channel: comm.Communicator
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


class _Reader:
    """Reads elements of the checkpoint's tensors, checking sizes and checksums."""

    def __init__(self, directory: Path, body: dict[str, Any]) -> None:
        self.directory = directory
        self.tensors = body["tensors"]
        self._files: dict[str, Any] = {}
        _check_file_names(directory / MANIFEST, body)
        for name, nbytes in body["files"].items():
            try:
                size = (directory / name).stat().st_size
            except FileNotFoundError:
                raise CheckpointError(f"{directory / name} is missing") from None
            if size != nbytes:
                raise CheckpointError(
                    f"{directory / name} holds {size} bytes but the manifest records {nbytes}: "
                    "the file was truncated or changed after the checkpoint was saved"
                )

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        for file in self._files.values():
            file.close()

    def numel(self, key: str) -> int:
        return math.prod(self.tensors[key]["shape"])

    def read(self, key: str, start: int = 0, end: int | None = None) -> Tensor:
        """Elements [start, end) of the flattened tensor ``key`` (all by default), 1-D."""
        meta = self.tensors.get(key)
        if meta is None:
            raise CheckpointError(f"the checkpoint has no tensor {key!r}")
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor {key!r} has an unknown dtype {meta['dtype']!r}")
        end = self.numel(key) if end is None else end
        out = torch.empty(end - start, dtype=dtype)
        covered = 0
        for chunk in meta["chunks"]:
            lo, hi = max(start, chunk["start"]), min(end, chunk["end"])
            if lo < hi:
                values = self._read_chunk(key, chunk, dtype)
                out[lo - start : hi - start] = values[lo - chunk["start"] : hi - chunk["start"]]
                covered += hi - lo
        if covered != end - start:
            raise CheckpointError(
                f"elements [{start}, {end}) of {key!r} are not each in exactly one chunk of the "
                "checkpoint's files"
            )
        return out

    def _read_chunk(self, key: str, chunk: dict[str, Any], dtype: torch.dtype) -> Tensor:
        values = torch.empty(chunk["end"] - chunk["start"], dtype=dtype)
        raw = _raw_bytes(values)
        if chunk["file"] not in self._files:
            self._files[chunk["file"]] = open(self.directory / chunk["file"], "rb")  # noqa: SIM115
        file = self._files[chunk["file"]]
        file.seek(chunk["offset"])
        if file.readinto(raw) != raw.nbytes or zlib.crc32(raw) != chunk["crc32"]:
            raise CheckpointError(
                f"elements [{chunk['start']}, {chunk['end']}) of {key!r} in "
                f"{self.directory / chunk['file']} fail their checksum: the file is corrupt"
            )
        return values


def _check_file_names(manifest: Path, body: dict[str, Any]) -> None:
    """Every file the manifest names is one of the checkpoint's own rank files, so that a
    crafted manifest cannot make a load read outside the checkpoint (``../``, absolute paths)."""
    for name in body["files"]:
        match = _RANK_FILE.fullmatch(name)
        if match is None or int(match.group(1)) >= body["world_size"]:
            raise CheckpointError(
                f"{manifest} names {name!r}, but the checkpoint was saved by "
                f"{body['world_size']} rank(s), whose files are rank-00000.bin to "
                f"rank-{body['world_size'] - 1:05d}.bin"
            )
    listed = sorted(body["files"])
    for key, meta in body["tensors"].items():
        for chunk in meta["chunks"]:
            if chunk["file"] not in body["files"]:
                raise CheckpointError(
                    f"{manifest}: tensor {key!r} has a chunk in {chunk['file']!r}, which is not "
                    f"one of this checkpoint's rank files {listed}; shardadam.checkpoint.save "
                    "never writes such a manifest"
                )


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory} has no {MANIFEST}: not a published checkpoint"
        ) from None
    except ValueError as error:  # not UTF-8, or not JSON
        raise CheckpointError(f"{path} is corrupt: {error}") from None
    if not isinstance(document, dict) or set(document) != {"body", "crc32"}:
        raise CheckpointError(f"{path} is not a shardadam checkpoint manifest")
    body = document["body"]
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shardadam checkpoint manifest")
    if _json_crc(body) != document["crc32"]:
        raise CheckpointError(f"{path} fails its checksum: it was changed after it was saved")
    if body["version"] > VERSION:
        raise CheckpointError(
            f"{path} has format version {body['version']}; this shardadam reads versions up to "
            f"{VERSION}: upgrade shardadam"
        )
    return body


# ---------------------------------------------------------------------- helpers


def _communicator(optimizer: ShardedAdam | None, process_group: object | None) -> comm.Communicator:
    if optimizer is not None and process_group is None:
        return optimizer.comm
    return comm.Communicator(comm.default_group(process_group), "native")


def _everywhere(channel: comm.Communicator, action: Callable[[], Any]) -> list[Any]:
    """Collective: run ``action`` on every rank and gather what it returns; if it raised on any
    rank, raise on every rank (Note [agree before acting])."""
    try:
        result, failure = action(), None
    except Exception as error:
        result, failure = None, error
    shared = None if failure is None else (type(failure).__name__, str(failure))
    gathered = channel.all_gather_objects((shared, result))
    failed = [(rank, shared) for rank, (shared, _) in enumerate(gathered) if shared is not None]
    if not failed:
        return [result for _, result in gathered]
    if failure is not None and channel.world_size == 1:
        raise failure
    kind = failed[0][1][0]
    error_type = {
        cls.__name__: cls
        for cls in (CheckpointError, FileNotFoundError, PermissionError, TypeError, ValueError)
    }.get(kind, RuntimeError)
    message = "; ".join(f"rank {rank}/{channel.world_size}: {text}" for rank, (_, text) in failed)
    raise error_type(message) from failure


def _check_step(step: Any) -> int:
    if step is None:
        raise ValueError("save() needs step= (or an optimizer, whose iterations it takes)")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"Invalid step: {step!r} (expected an int >= 0)")
    return step


def _param_names(optimizer: ShardedAdam, model: torch.nn.Module | None) -> list[str]:
    """The optimizer's parameters by name, in optimizer order: the model's names where a model
    is given, else the optimizer's own (``ShardedAdam.param_names``)."""
    names = optimizer.param_names()
    if model is not None:
        in_model = {id(p): name for name, p in model.named_parameters()}
        params = _params_of(optimizer)
        names = [in_model.get(id(p), own) for p, own in zip(params, names)]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the optimizer's parameters have names used twice: {twice}")
    return names


def _params_of(optimizer: ShardedAdam | None) -> list[Tensor]:
    """The optimizer's parameters in its order (the indices of its state_dict); none without."""
    return [] if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]


def _check_same_names(what: str, here: list[str], saved: list[str]) -> None:
    missing, unexpected = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
    if missing or unexpected:
        raise CheckpointError(
            f"{what} differ from the checkpoint's: not in the checkpoint: {_preview(missing)}; "
            f"only in the checkpoint: {_preview(unexpected)}"
        )


def _check_shape(reader: _Reader, key: str, name: str, shape: torch.Size) -> None:
    meta = reader.tensors.get(key)
    if meta is None:
        raise CheckpointError(f"the checkpoint has no {key!r}")
    if tuple(meta["shape"]) != tuple(shape):
        raise CheckpointError(
            f"{name!r} has shape {tuple(shape)} here but {tuple(meta['shape'])} in the "
            f"checkpoint ({key!r})"
        )


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]" if names else "none"


def _raw_bytes(values: Tensor) -> Any:
    """The bytes of a 1-D tensor as a writable numpy array sharing its memory (CPU)."""
    flat = values.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy()


def _json_crc(body: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _json_value(value: Any, where: str) -> Any:
    """A hyperparameter or counter as JSON (0-d tensors as numbers)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v, where) for k, v in value.items()}
    raise TypeError(
        f"{where} is a {type(value).__name__}; a checkpoint stores JSON values (numbers, "
        "strings, lists, dicts) and 0-d tensors there"
    )


def _encode_extra(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """JSON for ``extra``, tensors replaced by references to the tensors they are saved as."""
    if isinstance(value, Tensor):
        tensors[path] = value
        return {_TENSOR_REF: path}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str) or "/" in key or key == _TENSOR_REF:
                raise TypeError(
                    f"{path} has the key {key!r}; extra's keys must be strings without '/'"
                )
        return {key: _encode_extra(v, f"{path}/{key}", tensors) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_extra(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{path} is a {type(value).__name__}; extra holds JSON values (numbers, strings, lists, "
        "dicts) and tensors"
    )


def _decode_extra(value: Any, reader: _Reader) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_REF}:
            key = value[_TENSOR_REF]
            return reader.read(key).view(reader.tensors[key]["shape"])
        return {key: _decode_extra(v, reader) for key, v in value.items()}
    if isinstance(value, list):
        return [_decode_extra(v, reader) for v in value]
    return value


# ---------------------------------------------------------------------- file-system operations
# Note [crash points]: every change a save makes to the file system is one call below, and each
# calls _before_operation first, so that a test can stop a save before any one of them (raise,
# or os._exit: a crash) and check what a crash at that point leaves behind.

_before_operation: Callable[[str, Path], None] | None = None
"""Tests only: called with (operation, path) before each operation below."""


def _at(operation: str, path: Path) -> None:
    if _before_operation is not None:
        _before_operation(operation, path)


def _make_dir(path: Path, exist_ok: bool = False) -> None:
    _at("mkdir", path)
    path.mkdir(parents=True, exist_ok=exist_ok)


def _create(path: Path) -> Any:
    """A new file, open for writing bytes."""
    _at("create", path)
    return open(path, "wb")  # noqa: SIM115


def _write(file: Any, data: Any) -> None:
    _at("write", Path(file.name))
    file.write(data)


def _fsync(file: Any) -> None:
    _at("fsync", Path(file.name))
    file.flush()
    os.fsync(file.fileno())


def _rename(source: Path, target: Path) -> None:
    _at("rename", source)
    source.rename(target)


def _remove_tree(path: Path) -> None:
    """Delete a directory and what it holds, one entry at a time, ignoring errors: it is
    hidden by then, and the next save removes what is left."""
    if path.is_symlink() or path.is_file():
        _remove_entry(path, os.unlink)
        return
    for parent, dirs, files in os.walk(path, topdown=False):
        for name in files:
            _remove_entry(Path(parent) / name, os.unlink)
        for name in dirs:
            _remove_entry(Path(parent) / name, os.rmdir)
    _remove_entry(path, os.rmdir)


def _remove_entry(path: Path, remove: Callable[[Path], None]) -> None:
    _at("remove", path)
    with contextlib.suppress(OSError):
        remove(path)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (where the platform allows)."""
    _at("fsync", path)
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
