"""How the ranks of a save or load agree (Note [agree before acting])."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import comm
from ..optimizer import ShardedOptimizer
from .format import CheckpointError


def communicator(
    optimizer: ShardedOptimizer | None, process_group: object | None
) -> comm.Communicator:
    if optimizer is not None and process_group is None:
        return optimizer.comm
    return comm.Communicator(comm.default_group(process_group), "native")


def everywhere(channel: comm.Communicator, action: Callable[[], Any]) -> list[Any]:
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
