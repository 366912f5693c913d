"""Flat buffers: the parameters of one bucket of one (param group, dtype) packed into one tensor.

Parameters become views into the flat parameter buffer (their ``nn.Parameter`` identity is
kept), so an update of the flat buffer or a collective into it changes the model with no copy.
Gradients are gathered into a flat gradient buffer of the same layout and reduced from there.

Note [gradient storage per stage]
    In one process, and at stage 1, the flat gradient buffer is kept and the shard gradient is
    a view of it. At stage 2 across ranks the full buffer lives only from the gathering of the
    gradients to their reduce-scatter, in a tensor lent by the reducer's pool (shared by all
    buckets, a few at a time); the reduced shard has storage of its own, so a rank keeps
    1/world_size of the gradients between steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import BufferLayout, Range, ShardPiece
from .pool import StoragePool

_MASKS_KEPT = 8  # shard masks cached per buffer


class FlatBuffer:
    """Flat parameter and gradient storage of one buffer, and this rank's shard of both."""

    def __init__(
        self, params: list[Tensor], layout: BufferLayout, rank: int, keep_full_grad: bool = True
    ) -> None:
        first = params[0]
        self.layout = layout
        self.params = params
        self.dtype = first.dtype
        self.device = first.device
        self.flat_param = torch.zeros(layout.padded_numel, dtype=self.dtype, device=self.device)
        self.shard = layout.shard(rank)
        self.pieces = layout.pieces(rank)
        self._piece_of = {piece.param_index: piece for piece in self.pieces}
        self._masks: dict[tuple[int, ...], Tensor] = {}
        with torch.no_grad():
            for param, span in zip(params, layout.params):
                view = self.param_view(span.index)
                view.copy_(param.detach().reshape(span.shape))
                # Rebinding .data keeps the Parameter object (and so module references and
                # hooks) while its storage becomes part of the flat buffer.
                param.data = view
        self._view_ptrs = [self.param_view(span.index).data_ptr() for span in layout.params]
        self.keep_full_grad = keep_full_grad
        self.flat_grad: Tensor | None = None
        self._grad_storage: Tensor | None = None  # lent by a pool (stage 2)
        if keep_full_grad:
            self.allocate_full_grad()
            self.shard_grad = self.flat_grad[self.shard.slice]
        else:
            self.shard_grad = torch.zeros(self.shard.numel, dtype=self.dtype, device=self.device)
        self.shard_grad_pieces = [self.shard_grad[p.local.slice] for p in self.pieces]
        self.piece_param_index = torch.tensor(
            [p.param_index for p in self.pieces], dtype=torch.long, device=self.device
        )

    def allocate_full_grad(self, pool: StoragePool | None = None, zeroed: bool = True) -> Tensor:
        """The full flat gradient buffer, allocated if it was released (stage 2): from
        ``pool`` if given, zeroed unless ``zeroed=False`` (the caller writes every element
        before reading any)."""
        if self.flat_grad is None:
            numel = self.layout.padded_numel
            if pool is None:
                self.flat_grad = torch.zeros_like(self.flat_param)
            else:
                self._grad_storage = pool.lend(numel, self.dtype, self.device)
                self.flat_grad = self._grad_storage[:numel]
                if zeroed:
                    self.flat_grad.zero_()
            self.grad_views = [self.grad_view(span.index) for span in self.layout.params]
            # The update may use the gradient as scratch space; step() re-zeroes the padding.
            self.grad_padding_views = [self.flat_grad[g.slice] for g in self.layout.padding()]
        return self.flat_grad

    def can_adopt_grad(self, grad: Tensor) -> bool:
        """Whether ``grad`` can serve as this buffer's full gradient as it is (stage 2): the
        buffer holds one parameter and no padding, and ``grad`` has its layout."""
        return (
            not self.keep_full_grad
            and self.flat_grad is None
            and len(self.params) == 1
            and grad.numel() == self.layout.padded_numel
            and grad.is_contiguous()
            and grad.dtype == self.dtype
            and grad.device == self.device
            and not grad.requires_grad
        )

    def adopt_full_grad(self, grad: Tensor) -> None:
        """Take ``grad`` (see ``can_adopt_grad``) as the full gradient, with no copy."""
        self.flat_grad = grad.view(-1)
        self.grad_views = [grad]
        self.grad_padding_views = []

    def release_full_grad(self, pool: StoragePool | None = None) -> None:
        """Drop the full gradient buffer once reduced, where the shard has its own storage
        (back to ``pool`` if it came from there)."""
        if not self.keep_full_grad:
            if self._grad_storage is not None and pool is not None:
                pool.give_back(self._grad_storage)
            self._grad_storage = None
            self.flat_grad = None
            self.grad_views = []
            self.grad_padding_views = []

    def first_detached(self) -> int | None:
        """The first parameter that is no longer a view of the flat buffer (its ``.data`` was
        replaced: ``model.double()``, ``.to(device)``), or None."""
        for index, (param, ptr) in enumerate(zip(self.params, self._view_ptrs)):
            if param.data_ptr() != ptr or param.dtype != self.dtype:
                return index
        return None

    def param_view(self, index: int) -> Tensor:
        span = self.layout.params[index]
        return self.flat_param[span.flat.slice].view(span.shape)

    def grad_view(self, index: int) -> Tensor:
        span = self.layout.params[index]
        return self.flat_grad[span.flat.slice].view(span.shape)

    @property
    def shard_param(self) -> Tensor:
        return self.flat_param[self.shard.slice]

    def piece_of(self, index: int) -> ShardPiece | None:
        """The part of parameter ``index`` inside this rank's shard, or None."""
        return self._piece_of.get(index)

    def shard_range_of(self, index: int) -> Range | None:
        """Elements of parameter ``index`` inside this rank's shard, in shard coordinates."""
        piece = self._piece_of.get(index)
        return None if piece is None else piece.local

    def shard_mask(self, param_indices: list[int]) -> Tensor:
        """Bool mask over the shard: True on the elements of the given parameters.

        Cached per set of parameters (a frozen or unused parameter asks for the same mask at
        every step): callers only read it."""
        key = tuple(sorted(set(param_indices)))
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.zeros(self.shard.numel, dtype=torch.bool, device=self.device)
            for index in key:
                local = self.shard_range_of(index)
                if local is not None:
                    mask[local.slice] = True
            if len(self._masks) >= _MASKS_KEPT:
                self._masks.clear()  # parameter sets that change every step: keep few
            self._masks[key] = mask
        return mask
