"""The bytes a rank holds, by kind (``memory_report``)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from .buffers import FlatBuffer
from .comm import Communicator
from .pool import ByteMeter
from .reducer import GradReducer
from .state import MOMENTUM, VELOCITY, VELOCITY_HAT, ShardState


def memory_report(
    buffers: list[FlatBuffer],
    shard_states: list[ShardState],
    reducer: GradReducer,
    comm: Communicator,
    meter: ByteMeter,
) -> dict[str, int]:
    """Bytes this rank holds, by kind, and the most it held at once (``peak``).

    ``slots`` sums the update rule's state (whatever slots the rule keeps, a factored rule's
    rows and columns included), of which
    ``moments`` are Adam's momentum and velocity and ``amsgrad_max`` its AMSGrad maxima;
    ``optimizer_state`` sums the sharded state (the rule's slots, EMA, fp32 master);
    ``grad_shards`` the reduced gradient shards with storage of their own (stage 2);
    ``full_grad_buffers`` the full flat gradient buffers (kept in one process and at stage
    1; at stage 2 those of the few buckets being gathered or reduced, lent from a pool
    that is emptied at the end of each step); ``late_grad_buffers`` gradients that arrived
    after their bucket's reduction started; ``comm_buffers`` the receive buffers of the
    ring and pairwise collectives in flight or kept within the step; ``param_buffers``
    the flat parameters (the model's). ``peak`` is the most bytes of all these held at
    once since construction or ``reset_memory_peak()`` (``meter``: what was lent).
    """
    kept_grads = _nbytes(b.flat_grad for b in buffers if b.keep_full_grad)
    report = {
        "moments": _nbytes(s.slots.get(k) for s in shard_states for k in (MOMENTUM, VELOCITY)),
        "amsgrad_max": _nbytes(s.slots.get(VELOCITY_HAT) for s in shard_states),
        "slots": _nbytes(
            t for s in shard_states for t in [*s.slots.values(), *s.factored.values()]
        ),
        "ema": _nbytes(s.ema for s in shard_states),
        "master_weights": _nbytes(s.master for s in shard_states),
        "grad_shards": _nbytes(b.shard_grad for b in buffers if not b.keep_full_grad),
        "full_grad_buffers": kept_grads + reducer.full_grad_nbytes(),
        "late_grad_buffers": reducer.late_nbytes(),
        "comm_buffers": comm.buffer_nbytes(),
        "param_buffers": _nbytes(b.flat_param for b in buffers),
    }
    report["optimizer_state"] = sum(report[k] for k in ("slots", "ema", "master_weights"))
    # Held throughout (allocated at construction, or lazily and then kept), plus the
    # most that the pools and late buffers lent at once.
    held = report["optimizer_state"] + report["grad_shards"] + kept_grads
    report["peak"] = held + report["param_buffers"] + meter.peak_nbytes
    return report


def _nbytes(tensors: Iterable[Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
