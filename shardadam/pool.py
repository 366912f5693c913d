"""Scratch tensors lent for one use and given back: the full gradient buffers of stage 2 and
the receive buffers of point-to-point collectives.

A fresh tensor per use costs page faults on CPU (about as much as a copy of it) on every
bucket of every step; a tensor kept per bucket would keep the whole model's worth alive. So a
pool keeps one tensor given back and lends it again to a request of the same size: models
repeat their layers, so consecutive buckets mostly have the same size. It does not serve
smaller requests from larger tensors: with uneven buckets every tensor would grow to the
largest bucket, which measured 5% more peak memory at stage 2 than fresh tensors.
``release()`` drops the free one (the reducer does when backward ends and at the end of each
step, so that between steps a rank holds only its shards).
"""

from __future__ import annotations

import torch
from torch import Tensor


class ByteMeter:
    """Bytes lent by the pools of one optimizer: now, and the most at once since a reset."""

    def __init__(self) -> None:
        self.now_nbytes = 0
        self.peak_nbytes = 0

    def add(self, nbytes: int) -> None:
        self.now_nbytes += nbytes
        self.peak_nbytes = max(self.peak_nbytes, self.now_nbytes)

    def remove(self, nbytes: int) -> None:
        self.now_nbytes -= nbytes

    def reset_peak(self) -> None:
        self.peak_nbytes = self.now_nbytes


class StoragePool:
    """1-D tensors lent for one use each; see the module docstring.

    ``meter`` (if given) counts every tensor the pool holds, free or lent."""

    def __init__(self, meter: ByteMeter | None = None) -> None:
        self._free: dict[tuple, Tensor] = {}  # at most one, by (numel, dtype, device)
        self._lent: dict[int, Tensor] = {}  # by id: tensors compare element-wise
        self._meter = meter or ByteMeter()

    def lend(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A 1-D tensor of ``numel`` elements, uninitialised, until ``give_back``."""
        key = (numel, dtype, device)
        storage = self._free.pop(key, None)
        if storage is None:
            storage = torch.empty(numel, dtype=dtype, device=device)
            self._meter.add(tensor_nbytes(storage))
        self._lent[id(storage)] = storage
        return storage

    def give_back(self, storage: Tensor) -> None:
        """Keep ``storage`` for the next request of its size, in place of the one kept."""
        del self._lent[id(storage)]
        self.release()
        self._free[(storage.numel(), storage.dtype, storage.device)] = storage

    def release(self) -> None:
        """Drop the free tensors (those lent stay lent)."""
        for storage in self._free.values():
            self._meter.remove(tensor_nbytes(storage))
        self._free.clear()

    def free_nbytes(self) -> int:
        """Bytes of the tensor kept for reuse (none lent)."""
        return sum(tensor_nbytes(t) for t in self._free.values())

    def nbytes(self) -> int:
        """Bytes of every tensor the pool holds, free or lent."""
        held = [*self._free.values(), *self._lent.values()]
        return sum(tensor_nbytes(t) for t in held)


def tensor_nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
