"""Gradient reduction: gradients into flat buckets as backward produces them, and the
reductions in flight. Knows buffers and collectives, not Adam.

Note [reduction during backward]
    Across ranks, a post-accumulate-grad hook stages each gradient into its bucket's flat
    gradient buffer and releases ``p.grad``; once every parameter of a bucket that takes a
    gradient has one, the bucket's reduction starts while backward goes on (stage 2:
    reduce-scatter; stage 1: all-reduce). Buckets start in their fixed order, so every rank
    issues the same collectives in the same order. When backward returns, an autograd final
    callback has started every bucket still waiting (a parameter unused on this rank: its
    zeros are this rank's contribution, as DDP does), so a collective the user issues between
    ``backward()`` and ``step()`` (logging, SyncBatchNorm) meets the same sequence on every
    rank, and ``zero_grad()`` or a failing ``step()`` waits only for what every rank started.

Note [reductions in flight at stage 2]
    A bucket's full gradient buffer (and, in pairwise mode, its receive buffer) lives until its
    reduce-scatter completes; kept to step(), every bucket's would be alive at once, the whole
    model's gradients on every rank. So at most _REDUCTIONS_IN_FLIGHT reductions are in flight:
    starting one more first waits for the oldest, whose full buffer goes back to a pool. Every
    rank starts the buckets in the same order, so the oldest one's peers have started it too.
    The pool's buffers serve any bucket as large or smaller, so a backward reuses about three
    (two in flight, one being filled) instead of allocating one per bucket (page faults, heap
    fragmentation on CPU); the spare ones are dropped when backward ends and all at the end of
    the step. A rank so holds for gradients its shards, plus two buckets' full buffers (and
    receive buffers) once backward returned, and only its shards between steps.

Note [gradients taken as they are]
    At stage 2 a bucket of one parameter without padding (a weight larger than
    ``bucket_cap_mb``; in models without biases, most of them) has the layout of the gradient
    autograd produced for it. In the modes whose reduce-scatter only reads its input (native,
    pairwise), that tensor itself is reduced: no copy into a staging buffer, whose bytes and
    time were most of backward's gradient traffic. A second gradient of the same step goes
    into a pool buffer, never into autograd's tensor.

Note [late gradients]
    A gradient can arrive for a bucket whose reduction has already started: a second backward
    before ``step()``, reentrant activation checkpointing of a shared layer (its inner
    backward ends first), a gradient left in ``p.grad`` (a parameter unfrozen after its hooks
    were placed, a gradient assigned by hand). It is added to a late buffer of its bucket; at
    ``step()`` the ranks agree (in the one small all-reduce the step makes anyway) on which
    buckets hold late gradients, and those are reduced once more and added. Gradients that
    arrive more than once before ``step()`` so add up, as in ``p.grad``, with the numbers of
    one process.

Note [accumulation without communication]
    With gradient_accumulation_steps, the flat gradient buffer is the accumulator: micro-steps
    add this rank's gradients (from ``p.grad``) to it with no communication, and the boundary
    step reduces the sum once.
"""

from __future__ import annotations

import collections
import functools
import weakref
from typing import Any

import torch
from torch import Tensor

from . import comm
from .buffers import FlatBuffer
from .grad_views import GradViews, refuse_sparse_grad
from .pool import ByteMeter, StoragePool, tensor_nbytes

_REDUCTIONS_IN_FLIGHT = 2  # stage 2: Note [reductions in flight at stage 2]


class GradReducer:
    """The gradients of a list of flat buffers, from ``p.grad`` or hooks to reduced shards.

    ``buffers`` is the optimizer's list, read at each call; ``add_buffer`` is called for each
    buffer appended to it. The optimizer sets the phase of the coming micro-step
    (``sync_enabled``, ``update_step``, ``starts_cycle``) before any backward of it.
    """

    def __init__(
        self,
        communicator: comm.Communicator,
        buffers: list[FlatBuffer],
        stage: int,
        meter: ByteMeter | None = None,
    ) -> None:
        """``meter`` counts the bytes of the full gradient buffers lent at stage 2 and of the
        late buffers (the optimizer's memory report)."""
        self.comm = communicator
        self._meter = meter or ByteMeter()
        self._grad_pool = StoragePool(self._meter)
        """Stage 2: the full gradient buffers, a few lent at a time (Note [reductions in
        flight at stage 2])."""
        self._adopted: set[int] = set()
        """Stage 2: buckets whose full gradient is autograd's tensor (Note [gradients taken
        as they are])."""
        self.buffers = buffers
        self.stage = stage
        self.sync_enabled = True
        self.update_step = True
        """This micro-step ends with an update (else gradients accumulate in ``p.grad``)."""
        self.starts_cycle = True
        """The flat gradient buffers hold nothing of earlier micro-steps."""
        self._have: list[set[int]] = []
        """Per buffer, the parameters whose gradient is staged (or late) for this step."""
        self._views = GradViews(buffers, self._have)  # one process
        self._waiting: list[set[int]] = []
        self._reductions: list[comm.Pending | None] = []
        self._in_flight: collections.deque[int] = collections.deque()  # buckets, oldest first
        self._reduced: list[bool] = []
        self._late: list[Tensor | None] = []
        self._accumulated: list[set[int]] = []
        """Per buffer, the parameters with a local sum in the accumulator (this cycle)."""
        self._next = 0
        self._hooked: list[set[int]] = []
        self._handles: list[Any] = []
        self._in_backward = False
        # Hooks are removed when the reducer is collected (their optimizer with it) or closed.
        self._finalizer = weakref.finalize(self, _remove_all, self._handles)

    # ------------------------------------------------------------------ hooks

    def add_buffer(self) -> None:
        """Track the buffer just appended to ``buffers`` (hooks across ranks)."""
        for per_buffer in (self._have, self._waiting, self._accumulated, self._hooked):
            per_buffer.append(set())
        self._reductions.append(None)
        self._reduced.append(False)
        self._late.append(None)
        self.hook_trainable()

    def hook_trainable(self) -> None:
        """Hook every parameter that takes gradients and has no hook yet (one frozen when its
        hooks were placed and unfrozen since: progressive unfreezing)."""
        if not self._finalizer.alive:
            return
        me = weakref.ref(self)
        for b, (buffer, hooked) in enumerate(zip(self.buffers, self._hooked)):
            for index, p in enumerate(buffer.params):
                if p.requires_grad and index not in hooked:
                    hook = functools.partial(_grad_ready_hook, me, b, index)
                    self._handles.append(p.register_post_accumulate_grad_hook(hook))
                    hooked.add(index)

    def close(self) -> None:
        """Remove every hook (the gradients of later backwards stay in ``p.grad``)."""
        self._finalizer()

    def on_grad_ready(self, b: int, index: int, param: Tensor) -> None:
        """Post-accumulate-grad hook: stage a gradient, start the buckets now complete."""
        if not (self.sync_enabled and self.update_step):
            return  # accumulate: gradients stay in p.grad until step()
        if not self.comm.active:
            if self.starts_cycle:
                self._views.bind(b, index, param)
            return
        if not self._in_backward:
            self._begin_backward()
        self._stage(b, index, param.grad)
        param.grad = None
        self._waiting[b].discard(index)
        while self._next < len(self.buffers) and not self._waiting[self._next]:
            self._start(self._next)

    def _begin_backward(self) -> None:
        self._in_backward = True
        self.hook_trainable()
        self._waiting = [
            {i for i in hooked if buffer.params[i].requires_grad} - have
            for buffer, hooked, have in zip(self.buffers, self._hooked, self._have)
        ]
        callback = functools.partial(_backward_end, weakref.ref(self))
        torch.autograd.Variable._execution_engine.queue_callback(callback)

    def on_backward_end(self) -> None:
        """Autograd final callback: start every bucket still waiting, in order."""
        self._in_backward = False
        for b in range(self._next, len(self.buffers)):
            self._start(b)
        # Only the reductions in flight need buffers until step(): the spare ones go.
        self._grad_pool.release()
        self.comm.release_buffers()

    # ------------------------------------------------------------------ staging

    def _started(self, b: int) -> bool:
        return self._reductions[b] is not None or self._reduced[b]

    def _stage(self, b: int, index: int, grad: Tensor) -> None:
        buffer = self.buffers[b]
        refuse_sparse_grad(buffer, index, grad)
        if self._started(b):
            # Note [late gradients]
            if self._late[b] is None:
                self._set_late(b, torch.zeros_like(buffer.flat_param))
            span = buffer.layout.params[index]
            self._late[b][span.flat.slice].view(span.shape).add_(grad)
        elif self._can_adopt(b, grad):
            # Note [gradients taken as they are]
            buffer.adopt_full_grad(grad)
            self._adopted.add(b)
            self._meter.add(tensor_nbytes(grad))
        else:
            if b in self._adopted:  # a second gradient: into a buffer of ours, not autograd's
                adopted = buffer.flat_grad
                self._release_full_grad(b)
                buffer.allocate_full_grad(self._grad_pool, zeroed=False).copy_(adopted)
            buffer.allocate_full_grad(self._grad_pool, zeroed=not self.starts_cycle)
            view = buffer.grad_views[index]
            if index in self._have[b] or not self.starts_cycle:
                view.add_(grad)
            else:
                view.copy_(grad)
        self._have[b].add(index)

    def _can_adopt(self, b: int, grad: Tensor) -> bool:
        return (
            self.starts_cycle
            and self.comm.active
            and self.comm.scatter_reads_only
            and self.buffers[b].can_adopt_grad(grad)
        )

    def _release_full_grad(self, b: int) -> None:
        """Stage 2: drop bucket ``b``'s full gradient (back to the pool, or autograd's)."""
        if b in self._adopted:
            self._adopted.discard(b)
            self._meter.remove(tensor_nbytes(self.buffers[b].flat_grad))
        self.buffers[b].release_full_grad(self._grad_pool)

    def _start(self, b: int) -> None:
        buffer = self.buffers[b]
        buffer.allocate_full_grad(self._grad_pool, zeroed=not self.starts_cycle)
        if self.starts_cycle:
            # Scratch from the last update: padding, and the views of parameters without a
            # gradient this step.
            stale = [v for i, v in enumerate(buffer.grad_views) if i not in self._have[b]]
            if stale or buffer.grad_padding_views:
                torch._foreach_zero_(stale + buffer.grad_padding_views)
        if self.comm.active:
            if self.stage == 2:
                self._finish_oldest_beyond(_REDUCTIONS_IN_FLIGHT - 1)
            self._reductions[b] = self.comm.start_reduce(
                buffer.flat_grad, buffer.shard_grad, scatter=self.stage == 2
            )
            self._in_flight.append(b)
        else:  # one process: the shard gradient is a view of the flat one already
            self._reduced[b] = True
        self._next = b + 1

    def _finish_oldest_beyond(self, limit: int) -> None:
        """Stage 2: wait for the oldest reductions while more than ``limit`` are in flight,
        releasing their full buffers (Note [reductions in flight at stage 2])."""
        while len(self._in_flight) > limit:
            self._finish_oldest()

    def collect(self) -> None:
        """At an update step: stage the gradients still in ``p.grad`` (those without a hook,
        assigned by hand, or accumulated under ``no_sync()``); across ranks ``p.grad`` is then
        released, as the hooks do. In one process ``p.grad`` is the truth (Note [gradients in
        one process] in ``grad_views``)."""
        if not self.comm.active:
            self._views.collect(self.starts_cycle)
            return
        for b, buffer in enumerate(self.buffers):
            for index, p in enumerate(buffer.params):
                if p.grad is not None:
                    self._stage(b, index, p.grad)
                    p.grad = None

    def release_bound_grads(self) -> None:
        """One process, after an update: drop the ``p.grad`` views of the flat buffers."""
        if not self.comm.active:
            self._views.release()

    def accumulate(self) -> None:
        """At a micro-step that does not update: add ``p.grad`` to the accumulators, with no
        communication (Note [accumulation without communication])."""
        for b, buffer in enumerate(self.buffers):
            buffer.allocate_full_grad(self._grad_pool, zeroed=not self.starts_cycle)
            with_grad = [i for i, p in enumerate(buffer.params) if p.grad is not None]
            for i in with_grad:
                if buffer.params[i].grad.is_sparse:
                    self._stage(b, i, buffer.params[i].grad)  # raises
            views = [buffer.grad_views[i] for i in with_grad]
            grads = [buffer.params[i].grad for i in with_grad]
            if not self.starts_cycle:
                if views:
                    torch._foreach_add_(views, grads)
                self._accumulated[b].update(with_grad)
                continue
            if views:
                torch._foreach_copy_(views, grads)
            missing = [v for i, v in enumerate(buffer.grad_views) if i not in with_grad]
            if missing or buffer.grad_padding_views:
                torch._foreach_zero_(missing + buffer.grad_padding_views)
            self._accumulated[b] = set(with_grad)

    def has_local_grads(self) -> bool:
        """Whether this rank holds any gradient for the coming step (staged or in p.grad)."""
        return any(self._have) or any(
            p.grad is not None for buffer in self.buffers for p in buffer.params
        )

    # ------------------------------------------------------------------ reduction

    def reduce(self) -> None:
        """Collective: start the buckets not started yet, in order, and wait for all; the
        reduced gradients stay (in ``shard_grad``) until ``reset()``."""
        for b in range(self._next, len(self.buffers)):
            self._start(b)
        self._wait()

    def _wait(self) -> None:
        while self._in_flight:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        b = self._in_flight[0]
        self._reductions[b].wait()  # if it raises, the bucket stays in flight for a retry
        self._reductions[b] = None
        self._in_flight.popleft()
        self._reduced[b] = True
        if self.stage == 2:
            self._release_full_grad(b)

    def agree(self, failed: bool) -> tuple[list[list[int]], list[bool], int]:
        """Collective (one small all-reduce): per buffer, the parameters with a gradient on
        any rank (Note [missing gradients across ranks]), whether any rank holds late
        gradients of it, and the highest rank + 1 that ``failed`` (0: none).

        The flags are a CPU tensor reduced over the host group, read once from host memory:
        no device sync (Note [host collectives] in ``comm``). One process reads its own sets.
        """
        mine = self.comm.rank + 1 if failed else 0
        if not self.comm.active:
            return [sorted(have) for have in self._have], [t is not None for t in self._late], mine
        flags = []
        for buffer, have, late in zip(self.buffers, self._have, self._late):
            flags += [int(i in have) for i in range(len(buffer.params))] + [int(late is not None)]
        flat = torch.tensor([*flags, mine], dtype=torch.int32)
        self.comm.host_all_reduce_max_(flat)
        agreed = flat.tolist()  # host memory: the one read of the step (Note [host collectives])
        present, late, offset = [], [], 0
        for buffer in self.buffers:
            n = len(buffer.params)
            present.append([i for i in range(n) if agreed[offset + i]])
            late.append(bool(agreed[offset + n]))
            offset += n + 1
        return present, late, agreed[-1]

    def reduce_late(self, late: list[bool]) -> None:
        """Collective: reduce the late buffers any rank holds (zeros where this rank has
        none) and add them to the reduced gradients (Note [late gradients])."""
        pending = []
        for b, buffer in enumerate(self.buffers):
            if not late[b]:
                continue
            flat = self._late[b]
            if flat is None:
                flat = torch.zeros_like(buffer.flat_param)
            if self.stage == 2:
                shard = torch.empty_like(buffer.shard_grad)
            else:
                shard = flat[buffer.shard.slice]
            reduction = self.comm.start_reduce(flat, shard, scatter=self.stage == 2)
            pending.append((reduction, buffer, flat, shard))
            self._set_late(b, None)
        for reduction, buffer, flat, shard in pending:
            reduction.wait()
            if self.stage == 2:
                buffer.shard_grad.add_(shard)
            else:
                buffer.flat_grad.add_(flat)

    def reset(self) -> None:
        """Wait for the reductions in flight and drop everything staged for this step; the
        next step starts with none (the accumulators are kept within a cycle)."""
        self._wait()
        for b in range(len(self.buffers)):
            if self.stage == 2 and self._have[b]:
                self._release_full_grad(b)
            self._have[b] = set()
            self._reduced[b] = False
            self._set_late(b, None)
        self._next = 0
        self._in_backward = False
        # Between steps a rank holds only its shards (the accumulators stay lent).
        self._grad_pool.release()
        self.comm.release_buffers()

    def _set_late(self, b: int, late: Tensor | None) -> None:
        """Replace bucket ``b``'s late gradients, keeping the meter's count."""
        if self._late[b] is not None:
            self._meter.remove(tensor_nbytes(self._late[b]))
        if late is not None:
            self._meter.add(tensor_nbytes(late))
        self._late[b] = late

    def has_staged(self) -> bool:
        """Whether gradients are staged, reducing or reduced for the coming update."""
        return any(self._have) or bool(self._in_flight)

    def end_cycle(self) -> None:
        """After an update: the accumulators are consumed."""
        self._accumulated = [set() for _ in self.buffers]

    # ------------------------------------------------------------------ accumulators

    def accumulated(self, b: int) -> set[int]:
        """The parameters of buffer ``b`` with a local gradient sum in this cycle."""
        return self._accumulated[b]

    def restore_accumulated(self, b: int, sums: dict[int, Tensor]) -> None:
        """Put back this rank's local gradient sums of buffer ``b`` (by parameter index)."""
        buffer = self.buffers[b]
        buffer.allocate_full_grad(self._grad_pool)
        for index, values in sums.items():
            buffer.grad_views[index].copy_(values)
        self._accumulated[b] = set(sums)

    def late_nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self._late if t is not None)

    def full_grad_nbytes(self) -> int:
        """Stage 2: bytes of the full gradient buffers held now: those of buckets being
        gathered or reduced (lent by the pool, or autograd's own) and the pool's spare."""
        lent = [
            b.flat_grad for b in self.buffers if b.flat_grad is not None and not b.keep_full_grad
        ]
        return sum(tensor_nbytes(t) for t in lent) + self._grad_pool.free_nbytes()


def _grad_ready_hook(reducer_ref: weakref.ref, b: int, index: int, param: Tensor) -> None:
    # The hook holds the reducer weakly: a discarded optimizer neither stays alive through
    # its parameters nor keeps taking their gradients.
    reducer = reducer_ref()
    if reducer is not None:
        reducer.on_grad_ready(b, index, param)


def _backward_end(reducer_ref: weakref.ref) -> None:
    reducer = reducer_ref()
    if reducer is not None:
        reducer.on_backward_end()


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
