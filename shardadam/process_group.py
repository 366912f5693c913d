"""The process group that all the jobs of one process share: the training app's runs.

A process that calls :func:`distributed_job` once per job (each job of a Hydra sweep is a call
of ``shardadam.train.train``) starts torch.distributed in its first job, through
``shardadam.bootstrap``, and keeps it until it exits.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .bootstrap import DistributedContext, resolve_backend, start_process_group

# Note [one process group per process]
#     A Hydra sweep (--multirun) runs its jobs one after another in each rank's process. A
#     process group per job means a new rendezvous per job on the same store and port, while
#     a peer may still be tearing the last group down: at 2 ranks the next job then fails now
#     and then with "Connection reset by peer". So the first job starts the group and later
#     jobs reuse it; it is destroyed when the process exits. The ranks meet at each job's end,
#     so no rank starts the next job's collectives while another is still finishing this one.
#     A job that raises destroys the group: the other ranks' collectives then fail at once
#     (not at the timeout) and later jobs raise, for no job can know where its peers stopped.

_kept: _KeptGroup | None = None


@dataclass
class _KeptGroup:
    context: DistributedContext
    settings: dict[str, object]
    failure: str | None = None  # why the group was destroyed, if it was


@contextlib.contextmanager
def distributed_job(
    timeout_s: float = 600.0, *, backend: str = "auto", expected_world_size: int | None = None
) -> Iterator[DistributedContext]:
    """Collective: run one job of this process (one of a sweep's jobs) on the process group the
    first job started, kept until the process exits (Note [one process group per process]).

    The arguments are those of :func:`shardadam.bootstrap.distributed_from_env`; every job
    must pass the same. At the end of a job the ranks wait for each other; a job that raises
    destroys the group. A single process has no group: each job starts afresh.
    """
    global _kept
    settings = {
        "distributed.backend": resolve_backend(backend, torch.cuda.is_available()),
        "distributed.timeout_s": timeout_s,
        "distributed.world_size": expected_world_size,
    }
    if _kept is None:
        context = start_process_group(
            timeout_s, settings["distributed.backend"], expected_world_size
        )
        if not dist.is_initialized():  # a single process: no group, nothing to keep
            yield context
            return
        _kept = _KeptGroup(context, settings)
        atexit.register(_destroy_kept_group)
    else:
        _check_same_job_settings(_kept, settings)
    try:
        yield _kept.context
    except BaseException as error:
        if _kept.failure is None:
            _kept.failure = f"{type(error).__name__}: {error}"
            dist.destroy_process_group()
        raise
    dist.barrier()


def _check_same_job_settings(kept: _KeptGroup, settings: dict[str, object]) -> None:
    where = f"rank {kept.context.rank}/{kept.context.world_size}"
    if kept.failure is not None:
        raise RuntimeError(
            f"{where}: an earlier job of this process failed ({kept.failure}) and took the "
            "process group down with it: launch the remaining jobs again"
        )
    for key, value in settings.items():
        if kept.settings[key] != value:
            raise RuntimeError(
                f"{where}: {key}={value!r} here, but the process group this process keeps "
                f"started with {kept.settings[key]!r}: every job of a sweep shares it, so "
                f"sweep over {key} in separate launches"
            )


def _destroy_kept_group() -> None:
    if _kept is not None and _kept.failure is None and dist.is_initialized():
        dist.destroy_process_group()
