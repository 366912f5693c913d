"""Keras's gradient clipping over sharded gradients: per tensor, by global norm, and the norm
that ``last_grad_norm`` reports.

A tensor's norm, or the model's, has partial sums on several ranks wherever shard boundaries
cut it. Each clip mode makes one small all-reduce of those partial sums per step, so every
rank scales its pieces by the same factor one process would use. Clipping by value needs no
communication: the update kernel clamps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .buffers import FlatBuffer
from .comm import Communicator
from .functional import clip_by_norm_, global_clip_scale, piece_squared_norms, squared_norm


class GradClipper:
    """Clips the owned shard gradients of ``buffers`` in place, as Keras clips whole tensors."""

    def __init__(
        self, comm: Communicator, buffers: list[FlatBuffer], global_clipnorm: float | None
    ) -> None:
        self.comm = comm
        self.buffers = buffers  # the optimizer's list: buffers added later are clipped too
        self.global_clipnorm = global_clipnorm
        self.last_grad_norm: Tensor | None = None
        """The global L2 norm of the gradients of the last update, before clipping."""

    def clip_(self, clipnorms: list[float | None]) -> tuple[Tensor | None, list[Tensor | None]]:
        """Collective when sharded: clip per tensor (``clipnorms[b]``: buffer b's clipnorm, or
        None) and return the global-clip factor for the update kernel (None without it).

        Also returns, per buffer, the local pre-clip squared norm where clipping had to compute
        it anyway (None elsewhere: the update kernel reduces it in its own pass).
        """
        if self.global_clipnorm is not None:
            local_sq = [squared_norm(b.shard_grad) for b in self.buffers]
            self.record_grad_norm(local_sq)
            factor = global_clip_scale(self.last_grad_norm, self.global_clipnorm)
            return factor, list(local_sq)
        return None, self._clip_by_norm_per_tensor(clipnorms)

    def _clip_by_norm_per_tensor(self, clipnorms: list[float | None]) -> list[Tensor | None]:
        """Keras's clipnorm; per buffer, the local squared norm before clipping (or None)."""
        local_sq: list[Tensor | None] = [None] * len(self.buffers)
        clipped = [b for b in range(len(self.buffers)) if clipnorms[b] is not None]
        if not clipped:
            return local_sq
        # One all-reduce of every clipped buffer's per-parameter partial sums of squares (a
        # tensor cut by a shard boundary has a partial sum on each of its ranks).
        partials = []
        for b in clipped:
            buffer = self.buffers[b]
            per_param = torch.zeros(len(buffer.params), dtype=torch.float32, device=buffer.device)
            if buffer.pieces:
                piece_sq = piece_squared_norms(buffer.shard_grad_pieces).to(buffer.device)
                per_param.index_add_(0, buffer.piece_param_index, piece_sq)
            local_sq[b] = per_param.sum()
            partials.append(per_param)
        summed = torch.cat(partials)
        self.comm.all_reduce_sum_(summed)
        offset = 0
        for b in clipped:
            buffer = self.buffers[b]
            per_param = summed[offset : offset + len(buffer.params)]
            offset += len(buffer.params)
            piece_sq = [per_param[p.param_index] for p in buffer.pieces]
            clip_by_norm_(buffer.shard_grad_pieces, piece_sq, clipnorms[b])
        return local_sq

    def record_grad_norm(self, local_sq: list[Tensor]) -> None:
        """Collective when sharded: ``last_grad_norm`` from each buffer's local squared norm."""
        total_sq = torch.stack([s.to(torch.float64) for s in local_sq]).sum()
        self.comm.all_reduce_sum_(total_sq)
        self.last_grad_norm = total_sq.sqrt().to(torch.float32)
