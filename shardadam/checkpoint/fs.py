"""Every change a checkpoint save makes to the file system, one call each.

Note [crash points]
    Each operation below calls ``before_operation`` first (None but in tests), so that a test
    can stop a save before any one of them (raise, or ``os._exit``: a crash) and check what a
    crash at that point leaves behind. A save changes the file system only through these.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

before_operation: Callable[[str, Path], None] | None = None
"""Tests only: called with (operation, path) before each operation below."""


def _at(operation: str, path: Path) -> None:
    if before_operation is not None:
        before_operation(operation, path)


def make_dir(path: Path, exist_ok: bool = False) -> None:
    _at("mkdir", path)
    path.mkdir(parents=True, exist_ok=exist_ok)


def create(path: Path) -> Any:
    """A new file, open for writing bytes."""
    _at("create", path)
    return open(path, "wb")  # noqa: SIM115


def write(file: Any, data: Any) -> None:
    _at("write", Path(file.name))
    file.write(data)


def fsync(file: Any) -> None:
    _at("fsync", Path(file.name))
    file.flush()
    os.fsync(file.fileno())


def rename(source: Path, target: Path) -> None:
    _at("rename", source)
    source.rename(target)


def remove_tree(path: Path) -> None:
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


def fsync_dir(path: Path) -> None:
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
