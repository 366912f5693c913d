"""Checkpoints in a root directory: finding them, publishing one, re-saving and removing
(Notes [atomic publication] and [re-saving a step] in the package docstring)."""

from __future__ import annotations

import os
import re
import uuid
import warnings
from pathlib import Path

from . import fs
from .format import MANIFEST, CheckpointError

_STEP_DIR = re.compile(r"step-(\d+)")
_NEW_SUFFIX = ".new"
_NEW_COPY = re.compile(r"step-(\d+)\.new")
_HIDDEN_PREFIXES = (".partial-", ".removing-")


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


def resolve(path: Path) -> Path:
    """The checkpoint ``load(path)`` reads: ``path`` itself, its new copy while a re-save swaps
    it in, or the latest in a root."""
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


def start_partial(root: Path, step: int) -> Path:
    """Rank 0: make the save's hidden directory, after finishing what killed saves left
    (Note [re-saving a step]) and removing their hidden directories."""
    fs.make_dir(root, exist_ok=True)
    if not os.access(root, os.W_OK):
        raise PermissionError(f"checkpoint directory {root} is not writable")
    _finish_swaps(root)
    for entry in root.iterdir():
        if entry.name.startswith(_HIDDEN_PREFIXES):
            fs.remove_tree(entry)
    partial = root / f".partial-step-{step:08d}-{uuid.uuid4().hex[:12]}"
    fs.make_dir(partial)
    return partial


def publish(root: Path, partial: Path, step: int, keep_last: int | None) -> Path:
    """Rank 0: publish the complete checkpoint in ``partial`` as ``step-<step>`` (Notes
    [atomic publication] and [re-saving a step]), then apply ``keep_last``."""
    target = checkpoint_path(root, step)
    if target.exists():
        new = target.with_name(target.name + _NEW_SUFFIX)
        fs.rename(partial, new)
        fs.fsync_dir(root)
        _swap_in(new, target)
    else:
        fs.rename(partial, target)
        fs.fsync_dir(root)
    _prune(root, keep_last, step, target)
    return target


def _swap_in(new: Path, target: Path) -> None:
    """Replace ``target`` by the complete copy ``new``: Note [re-saving a step]."""
    hidden = None
    if target.exists():
        hidden = _hidden_name(target)
        fs.rename(target, hidden)
        fs.fsync_dir(target.parent)
    fs.rename(new, target)
    fs.fsync_dir(target.parent)
    if hidden is not None:
        fs.remove_tree(hidden)


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
    fs.rename(path, hidden)
    fs.remove_tree(hidden)


def _hidden_name(path: Path) -> Path:
    """Where a checkpoint goes out of sight before it is deleted."""
    return path.with_name(f".removing-{path.name}-{uuid.uuid4().hex[:12]}")
