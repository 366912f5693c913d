"""Flat buffers: the parameters of one (param group, dtype, device) packed into one tensor.

Parameters become views into the flat parameter buffer (their ``nn.Parameter`` identity is
kept), so an update of the flat buffer or a collective into it changes the model with no copy.
Gradients are gathered into a flat gradient buffer of the same layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import BufferLayout, Range


class FlatBuffer:
    """Flat parameter and gradient storage of one buffer, and this rank's shard of both."""

    def __init__(self, params: list[Tensor], layout: BufferLayout, rank: int) -> None:
        first = params[0]
        self.layout = layout
        self.params = params
        self.dtype = first.dtype
        self.device = first.device
        self.flat_param = torch.zeros(layout.padded_numel, dtype=self.dtype, device=self.device)
        self.flat_grad = torch.zeros_like(self.flat_param)
        self.shard = layout.shard(rank)
        self.pieces = layout.pieces(rank)
        with torch.no_grad():
            for param, span in zip(params, layout.params):
                view = self.param_view(span.index)
                view.copy_(param.detach().reshape(span.shape))
                # Rebinding .data keeps the Parameter object (and so module references and
                # hooks) while its storage becomes part of the flat buffer.
                param.data = view
        self.grad_views = [self.grad_view(span.index) for span in layout.params]
        # The update may use the gradient buffer as scratch space; step() re-zeroes these.
        self.grad_padding_views = [self.flat_grad[gap.slice] for gap in layout.padding()]
        self.shard_grad_pieces = [self.shard_grad[p.local.slice] for p in self.pieces]

    def param_view(self, index: int) -> Tensor:
        span = self.layout.params[index]
        return self.flat_param[span.flat.slice].view(span.shape)

    def grad_view(self, index: int) -> Tensor:
        span = self.layout.params[index]
        return self.flat_grad[span.flat.slice].view(span.shape)

    @property
    def shard_param(self) -> Tensor:
        return self.flat_param[self.shard.slice]

    @property
    def shard_grad(self) -> Tensor:
        return self.flat_grad[self.shard.slice]

    def shard_range_of(self, index: int) -> Range | None:
        """Elements of parameter ``index`` inside this rank's shard, in shard coordinates."""
        overlap = self.layout.params[index].flat.intersect(self.shard)
        return None if overlap is None else overlap.shift(-self.shard.start)

    def shard_mask(self, param_indices: list[int]) -> Tensor:
        """Bool mask over the shard: True on the elements of the given parameters."""
        mask = torch.zeros(self.shard.numel, dtype=torch.bool, device=self.device)
        for index in param_indices:
            local = self.shard_range_of(index)
            if local is not None:
                mask[local.slice] = True
        return mask
