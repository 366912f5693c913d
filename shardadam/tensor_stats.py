"""Per-tensor statistics over sharded buffers, for rules that scale each tensor's update by a
statistic of the whole tensor (Note [per-tensor statistics] in ``functional``).

A rank's shard holds pieces of several tensors, and a tensor cut by a shard boundary has a
piece on each of its ranks. The sums of a rule's elementwise terms over each piece are placed
at their tensor's index, every buffer's sums go into one small all-reduce, and each element
then receives the value of its own tensor: the same on every rank as in one process.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .buffers import FlatBuffer
from .comm import Communicator
from .layout import complement


class TensorStatistics:
    """Sums elementwise terms over each tensor of ``buffers`` across the ranks of ``comm``."""

    def __init__(self, comm: Communicator, buffers: list[FlatBuffer]) -> None:
        self.comm = comm
        self.buffers = buffers  # the optimizer's list: buffers added later are covered too

    def sum_per_tensor(self, terms: list[Tensor]) -> list[Tensor]:
        """Collective when sharded: ``terms[b]`` (``[k, shard numel]`` of buffer b) summed over
        each of its tensors on every rank, as ``[k, tensors of buffer b]``; one all-reduce."""
        local = [self._local_sums(b, t) for b, t in zip(self.buffers, terms)]
        if not local:
            return []
        widths = [s.shape[1] for s in local]
        summed = torch.cat(local, dim=1)
        self.comm.all_reduce_sum_(summed)
        return list(summed.split(widths, dim=1))

    @staticmethod
    def _local_sums(buffer: FlatBuffer, terms: Tensor) -> Tensor:
        sums = terms.new_zeros(terms.shape[0], len(buffer.params))
        if buffer.pieces:
            pieces = [terms[:, piece.local.slice].sum(1) for piece in buffer.pieces]
            sums.index_copy_(1, buffer.piece_param_index.to(terms.device), torch.stack(pieces, 1))
        return sums

    @staticmethod
    def sizes(buffer: FlatBuffer, dtype: torch.dtype) -> Tensor:
        """``[tensors]``: each tensor's element count, for rules that need means."""
        counts = [float(span.flat.numel) for span in buffer.layout.params]
        return torch.tensor(counts, dtype=dtype, device=buffer.device)

    @staticmethod
    def per_element(buffer: FlatBuffer, per_tensor: Tensor, out: Tensor | None = None) -> Tensor:
        """``[j, shard numel]``: each element's value of ``per_tensor`` (``[j, tensors]``),
        0 on padding; written into ``out`` if given."""
        if out is None:
            out = per_tensor.new_empty(per_tensor.shape[0], buffer.shard.numel)
        for piece in buffer.pieces:
            value = per_tensor[:, piece.param_index : piece.param_index + 1]
            out[:, piece.local.slice] = value.expand(-1, piece.local.numel)
        for gap in complement([p.local for p in buffer.pieces], buffer.shard.numel):
            out[:, gap.slice] = 0
        return out
