"""Collectives on flat buffers; with no process group (world size 1) each is a no-op.

This module knows nothing of Adam: it moves flat tensors split into ``world_size`` equal
chunks (see Note [equal shard sizes] in ``layout``) between ranks.

Note [collectives per backend]
    gloo's own reduce-scatter and all-gather are slow: measured on 200 MB at world size 2,
    ``reduce_scatter_tensor`` took 242 ms and ``all_gather_into_tensor`` 188 ms, where a ring of
    ``isend``/``irecv`` did them in 127 ms and 75 ms (``all_reduce`` 144 ms, one ``broadcast``
    per owner 85 ms). On NCCL the native reduce-scatter and all-gather are the optimum. So
    ``comm="auto"`` picks "pairwise" on gloo (as fast as the ring and asynchronous, so it
    overlaps backward) and "native" elsewhere; every mode gives the same sums.
      native:     reduce_scatter_tensor / all_gather_into_tensor
      ring:       W - 1 neighbour exchanges of one chunk each, for both directions
      pairwise:   every rank sends each peer its chunk directly, all posted at once, so the
                  exchange runs asynchronously like a native collective
      all_reduce: all_reduce for gradients, one broadcast per owning rank for parameters

Note [host collectives]
    A few small collectives decide what the caller does next (which gradients exist on any
    rank, whether one failed), so Python reads their result. Read from a CUDA tensor, that
    read waits until the GPU has run everything queued before it: the pipeline of the step
    drains. Those collectives therefore reduce CPU tensors over a gloo group of the same ranks,
    ``host_group``, and the read is of host memory. It is the group itself where the group
    handles CPU tensors (gloo), else a gloo group the communicator creates with the members'
    ``new_group(..., use_local_synchronization=True)``: only the members of a group construct
    its communicator, and without it ``new_group`` is a collective of the whole default group
    that names groups by a counter, so the disjoint subgroups of a 2-D mesh (data-parallel
    groups) would rendezvous under one name.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .pool import ByteMeter, StoragePool

_AUTO_BY_BACKEND = {"gloo": "pairwise", "nccl": "native"}
_CPU_BACKENDS = ("gloo", "mpi")  # a group on these reduces CPU tensors itself

FORCE_SEPARATE_HOST_GROUP = False
"""Give a gloo group a host group of its own, as a NCCL group has (Note [host collectives]):
tests set it so that the code of the NCCL path runs on gloo."""


def default_group(process_group: object | None) -> object | None:
    """The group to shard over: the one given, else the default group if one is initialised."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def rank_and_world_size(group: object | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def resolve_mode(mode: str, group: object | None) -> str:
    """The collective mode ``auto`` stands for on this group's backend."""
    if mode != "auto":
        return mode
    if group is None:
        return "native"
    return _AUTO_BY_BACKEND.get(str(dist.get_backend(group)), "native")


def _reduces_cpu_tensors(group: object) -> bool:
    """Whether the group's backend takes CPU tensors ("gloo", or "cpu:gloo,cuda:nccl")."""
    config = dist.get_backend_config(group)
    by_device = dict(item.split(":", 1) for item in config.split(",") if ":" in item)
    return by_device.get("cpu", config) in _CPU_BACKENDS


def _timeout_of(group: object) -> datetime.timedelta | None:
    """The group's collective timeout, so that its host group fails as fast; torch has no
    public getter, so None (new_group's default) where the private one is missing."""
    try:
        return group._get_backend(group._device_types[0]).options._timeout
    except (AttributeError, IndexError, RuntimeError):
        return None


class Pending:
    """Collectives in flight, and what to do with their result once they completed."""

    def __init__(self, works: list, finish: Callable[[], object]) -> None:
        self._works = works
        self._finish = finish

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._finish()


class Communicator:
    """The collectives of one process group in one mode (see Note [collectives per backend])."""

    def __init__(self, group: object | None, mode: str, meter: ByteMeter | None = None) -> None:
        """``meter`` counts the bytes of the receive buffers (the optimizer's memory report)."""
        self.group = group
        self.rank, self.world_size = rank_and_world_size(group)
        self.mode = resolve_mode(mode, group)
        # Receive buffers of the ring and pairwise modes, one per collective in flight (Note
        # [reductions in flight at stage 2] in ``reducer``), reused for buckets of one size.
        self._receive_pool = StoragePool(meter)
        self._host_group: object | None = None
        if self.world_size > 1:
            self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)]

    @property
    def host_group(self) -> object | None:
        """The group for collectives of CPU tensors (Note [host collectives]), made at its
        first use (a collective there, where it is a group of its own): communicators that
        never reduce host tensors (checkpointing's) create none."""
        if self._host_group is None and self.active:
            self._host_group = self._make_host_group()
        return self._host_group

    def _make_host_group(self) -> object:
        if _reduces_cpu_tensors(self.group) and not FORCE_SEPARATE_HOST_GROUP:
            return self.group
        return dist.new_group(
            self._global,
            timeout=_timeout_of(self.group),
            backend="gloo",
            use_local_synchronization=True,
        )

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def scatter_reads_only(self) -> bool:
        """Whether ``start_reduce(scatter=True)`` leaves its ``flat`` input as it was (the
        native and pairwise modes; the ring and all-reduce modes sum into it)."""
        return self.mode in ("native", "pairwise")

    def buffer_nbytes(self) -> int:
        """Bytes of the receive buffers this communicator holds (ring and pairwise modes),
        those of reductions in flight included."""
        return self._receive_pool.nbytes()

    def release_buffers(self) -> None:
        """Drop the receive buffers no collective in flight uses (until the next needs one)."""
        self._receive_pool.release()

    def _chunks(self, flat: Tensor) -> list[Tensor]:
        return list(flat.view(self.world_size, -1).unbind(0))

    def start_reduce(self, flat: Tensor, shard: Tensor, scatter: bool) -> Pending:
        """Collective, started asynchronously where the mode allows: average gradients.

        ``scatter=False`` (stage 1): ``flat`` becomes the mean over ranks. ``scatter=True``
        (stage 2): ``shard`` receives the mean of this rank's chunk and ``flat`` is scratch.
        The ring runs to completion here (each exchange needs the previous one's data); the
        native and all-reduce collectives run in the backend's threads until ``wait()``.
        """
        if not self.active:
            if scatter:
                shard.copy_(flat)
            return Pending([], lambda: None)
        if not scatter:
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            return Pending([work], lambda: flat.div_(self.world_size))
        if self.mode == "native":
            work = dist.reduce_scatter_tensor(
                shard, flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True
            )
            return Pending([work], lambda: shard.div_(self.world_size))
        if self.mode == "ring":
            self._ring_reduce_scatter_(flat, shard)
            shard.div_(self.world_size)
            return Pending([], lambda: None)
        if self.mode == "pairwise":
            return self._start_pairwise_reduce_scatter(flat, shard)
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return Pending(
            [work], lambda: shard.copy_(self._chunks(flat)[self.rank]).div_(self.world_size)
        )

    def reduce_scatter_mean_(self, flat: Tensor, shard: Tensor) -> None:
        """Collective: ``shard`` receives the mean over ranks of this rank's chunk of ``flat``.

        ``flat`` is used as scratch space and holds partial sums afterwards.
        """
        self.start_reduce(flat, shard, scatter=True).wait()

    def start_all_gather(self, flat: Tensor) -> Pending:
        """Collective, asynchronous where the mode allows: every rank's chunk of ``flat``
        reaches every rank, in place."""
        if not self.active:
            return Pending([], lambda: None)
        chunks = self._chunks(flat)
        if self.mode == "native":
            own = chunks[self.rank].clone()
            # torch 2.13 renamed all_gather_into_tensor; older releases have only that name.
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            return Pending([gather(flat, own, group=self.group, async_op=True)], lambda: None)
        if self.mode == "ring":
            self._ring_all_gather_(chunks)
            return Pending([], lambda: None)
        if self.mode == "pairwise":
            works = []
            for peer in range(self.world_size):
                if peer != self.rank:
                    works.append(
                        dist.isend(chunks[self.rank], self._global[peer], group=self.group)
                    )
                    works.append(dist.irecv(chunks[peer], self._global[peer], group=self.group))
            return Pending(works, lambda: None)
        works = [
            dist.broadcast(chunk, src=self._global[owner], group=self.group, async_op=True)
            for owner, chunk in enumerate(chunks)
        ]
        return Pending(works, lambda: None)

    def all_gather_(self, flat: Tensor) -> None:
        """Collective: every rank's chunk of ``flat`` reaches every rank, in place."""
        self.start_all_gather(flat).wait()

    def gather_to(self, shard: Tensor, dst: int) -> Tensor | None:
        """Collective: every rank's ``shard`` concatenated in rank order, on rank ``dst`` only."""
        if not self.active:
            return shard.clone()
        pieces = None
        if self.rank == dst:
            pieces = [torch.empty_like(shard) for _ in range(self.world_size)]
        dist.gather(shard, pieces, dst=self._global[dst], group=self.group)
        return torch.cat(pieces) if pieces is not None else None

    def reduce_sum_to_(self, tensor: Tensor, dst: int) -> None:
        """Collective: rank ``dst``'s ``tensor`` becomes the sum over ranks (others: scratch)."""
        if self.active:
            dist.reduce(tensor, dst=self._global[dst], op=dist.ReduceOp.SUM, group=self.group)

    def all_reduce_sum_(self, tensor: Tensor) -> None:
        """Collective: sum a (small) tensor over the ranks, in place."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def all_reduce_max_(self, tensor: Tensor) -> None:
        """Collective: elementwise maximum of a (small) tensor over the ranks, in place."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)

    def host_all_reduce_max_(self, tensor: Tensor) -> None:
        """Collective: elementwise maximum of a small CPU tensor over the ranks, in place, over
        the host group, so that its result is read with no device sync (Note [host
        collectives])."""
        if tensor.device.type != "cpu":
            raise ValueError(
                f"host_all_reduce_max_() reduces CPU tensors (Note [host collectives]); got "
                f"one on {tensor.device}"
            )
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.host_group)

    def all_gather_objects(self, obj: object) -> list[object]:
        """Collective: every rank's ``obj``, in rank order (just ``[obj]`` in one process)."""
        if not self.active:
            return [obj]
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def _exchange(self, send: Tensor, recv: Tensor) -> None:
        """Send to the right neighbour and receive from the left one."""
        right = self._global[(self.rank + 1) % self.world_size]
        left = self._global[(self.rank - 1) % self.world_size]
        requests = [
            dist.isend(send, right, group=self.group),
            dist.irecv(recv, left, group=self.group),
        ]
        for request in requests:
            request.wait()

    def _start_pairwise_reduce_scatter(self, flat: Tensor, shard: Tensor) -> Pending:
        # Each peer's chunk goes straight to it; our chunk's partial sums arrive from every
        # peer into buffers of their own, and are added once all have arrived.
        chunks = self._chunks(flat)
        shape = (self.world_size - 1, chunks[0].numel())
        storage = self._receive_pool.lend(shape[0] * shape[1], flat.dtype, flat.device)
        received = storage[: shape[0] * shape[1]].view(shape)
        peers = [p for p in range(self.world_size) if p != self.rank]
        works = []
        for peer, into in zip(peers, received.unbind(0)):
            works.append(dist.isend(chunks[peer], self._global[peer], group=self.group))
            works.append(dist.irecv(into, self._global[peer], group=self.group))

        def finish() -> None:
            torch.add(chunks[self.rank], received[0], out=shard)
            for partial in received[1:]:
                shard.add_(partial)
            shard.div_(self.world_size)
            self._receive_pool.give_back(storage)

        return Pending(works, finish)

    def _ring_reduce_scatter_(self, flat: Tensor, shard: Tensor) -> None:
        # At step s rank r passes on its partial sum of chunk r-s-1 and adds the one of chunk
        # r-s-2 from the left; after W-1 steps chunk r holds the sum over all ranks. The last
        # addition writes straight into ``shard``.
        chunks = self._chunks(flat)
        storage = self._receive_pool.lend(chunks[0].numel(), flat.dtype, flat.device)
        incoming = storage[: chunks[0].numel()]
        w, r = self.world_size, self.rank
        for s in range(w - 1):
            self._exchange(chunks[(r - s - 1) % w], incoming)
            target = (r - s - 2) % w
            if s == w - 2:
                torch.add(chunks[target], incoming, out=shard)
            else:
                chunks[target].add_(incoming)
        self._receive_pool.give_back(storage)

    def _ring_all_gather_(self, chunks: list[Tensor]) -> None:
        # At step s rank r passes on chunk r-s and receives chunk r-s-1 in place.
        w, r = self.world_size, self.rank
        for s in range(w - 1):
            self._exchange(chunks[(r - s) % w], chunks[(r - s - 1) % w])
