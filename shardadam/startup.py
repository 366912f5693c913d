"""Start-up decisions of the training app that every rank must share: where the run writes,
whether and from which checkpoint it resumes (Note [rank 0 decides])."""

from __future__ import annotations

import builtins
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import checkpoint
from .app_config import RESUME_AUTO
from .bootstrap import DistributedContext
from .checkpoint.directory import resolve as resolve_checkpoint


def check_writable(directory: Path, setting: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".writable-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as failure:
        raise PermissionError(
            f"cannot write to {directory} ({failure.strerror}); set {setting} to a writable "
            "directory"
        ) from None


def shared_output_dir(output_dir: Path, ctx: DistributedContext, checkpoint_dir: str) -> Path:
    """Collective: rank 0's output directory for every rank (each rank's Hydra picked its own,
    from its own clock), after rank 0 checked that it can write the checkpoints there and every
    rank that it sees what rank 0 writes there: each rank writes its part of every checkpoint
    into the directory rank 0 made (Note [rank 0 decides])."""

    def make_probe() -> tuple[str, str | None]:
        checkpoints = output_dir / checkpoint_dir
        check_writable(checkpoints, "trainer.checkpoint_dir")
        if ctx.world_size == 1:
            return str(output_dir), None
        probe = checkpoints / f".shared-probe-{uuid.uuid4().hex}"
        probe.write_text("")
        return str(output_dir), str(probe)

    shared, probe = _decide_on_rank_0(ctx, make_probe)
    if probe is None:
        return Path(shared)
    try:
        _check_on_every_rank(
            ctx,
            lambda: _unreadable(Path(probe), "rank 0 just wrote into trainer.checkpoint_dir"),
            _SHARED_FILE_SYSTEM,
        )
    finally:
        if ctx.is_main:
            Path(probe).unlink(missing_ok=True)
    return Path(shared)


def decide_resume(source: Path, ctx: DistributedContext, required: bool = False) -> Path | None:
    """Collective: the checkpoint every rank resumes from, or None to start from step 0.

    ``source`` is a checkpoint or a directory of them (its latest published one is taken).
    Rank 0 decides and every rank follows (Note [rank 0 decides]): where rank 0 finds none,
    all start afresh, whatever the others see, or all raise if ``required``. Every rank then
    checks that it can read rank 0's choice; if one cannot (a directory that is not shared),
    or rank 0 could not look, every rank raises the same error.
    """
    chosen = _decide_on_rank_0(ctx, lambda: _checkpoint_in(source, required))
    if chosen is None:
        return None
    path = Path(chosen)
    _check_on_every_rank(
        ctx,
        lambda: _unreadable(path / checkpoint.MANIFEST, "rank 0 chose to resume from"),
        f"{_SHARED_FILE_SYSTEM}, or set trainer.resume=null to start afresh",
    )
    return path


def _checkpoint_in(source: Path, required: bool) -> str | None:
    try:
        return str(resolve_checkpoint(source))
    except FileNotFoundError as missing:
        if not required:
            return None
        raise FileNotFoundError(
            f"Invalid trainer.resume: {missing}; give a checkpoint (a step-<N> directory) or "
            f"a directory holding some, or trainer.resume={RESUME_AUTO} to continue from "
            "trainer.checkpoint_dir's latest checkpoint where there is one"
        ) from None


# Note [rank 0 decides]
#     Ranks can see different files: a checkpoint directory on a node-local disk, or one that a
#     network file system has not yet shown every node. A choice that sets which collectives
#     follow (resume or not, from which checkpoint, where to write) is made by rank 0 alone and
#     broadcast; every rank then checks that it can act on it, and the ranks exchange the
#     result, so that all raise the same error or none does. No rank goes down one branch
#     while another waits in a collective of the other branch (until the process group's
#     timeout).

_SHARED_FILE_SYSTEM = (
    "trainer.checkpoint_dir must be on a file system that every rank shares, at the same path"
)


def _decide_on_rank_0(ctx: DistributedContext, decide: Callable[[], Any]) -> Any:
    """Collective: rank 0's ``decide()`` on every rank; if it raised, every rank raises an error
    of the same type and message (Note [rank 0 decides])."""
    shared: list[Any] = [None, None]
    failure = None
    if ctx.is_main:
        try:
            shared[0] = decide()
        except Exception as error:  # whatever it is, the other ranks must hear of it
            failure = error
            shared[1] = (type(error).__name__, str(error))
    if ctx.world_size > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[1] is None:
        return shared[0]
    if failure is not None and ctx.world_size == 1:
        raise failure
    kind, message = shared[1]
    error_type = getattr(builtins, kind, None)
    if not (isinstance(error_type, type) and issubclass(error_type, Exception)):
        error_type = RuntimeError
    raise error_type(f"rank 0/{ctx.world_size}: {message}") from failure


def _check_on_every_rank(
    ctx: DistributedContext, check: Callable[[], str | None], fix: str
) -> None:
    """Collective: ``check()`` on every rank (None: fine here, else what is wrong); if it found
    a problem on any rank, every rank raises the same RuntimeError naming them and the fix."""
    try:
        problem = check()
    except Exception as error:  # an unforeseen failure must reach every rank too
        problem = f"{type(error).__name__}: {error}"
    problems = [problem]
    if ctx.world_size > 1:
        problems = [None] * ctx.world_size
        dist.all_gather_object(problems, problem)
    failed = [f"rank {r}/{ctx.world_size} {p}" for r, p in enumerate(problems) if p is not None]
    if failed:
        raise RuntimeError(f"{'; '.join(failed)}; {fix}")


def _unreadable(path: Path, what: str) -> str | None:
    """None if this process can open ``path``, else why not (for an error message)."""
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        return f"cannot read {path}, which {what} ({error.strerror or error})"
    return None
