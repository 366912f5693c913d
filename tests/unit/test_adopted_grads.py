"""Note [gradients taken as they are] (reducer): autograd's tensor is reduced as it is, and a
second gradient of the step never writes into it. The reducer runs here with a stand-in
communicator of two ranks whose reductions are never started."""

from __future__ import annotations

import torch

from shardadam.buffers import FlatBuffer
from shardadam.layout import build_layout
from shardadam.reducer import GradReducer


class TwoRanksNeverStarted:
    active = True
    rank, world_size = 0, 2
    scatter_reads_only = True

    def release_buffers(self) -> None:
        pass


def staged_twice(shape: tuple[int, ...]) -> tuple[FlatBuffer, GradReducer, torch.Tensor]:
    param = torch.nn.Parameter(torch.zeros(shape))
    layout = build_layout([shape], ["w"], world_size=2)
    buffer = FlatBuffer([param], layout, rank=0, keep_full_grad=False)
    buffers: list[FlatBuffer] = []
    reducer = GradReducer(TwoRanksNeverStarted(), buffers, stage=2)
    buffers.append(buffer)
    reducer.add_buffer()
    return buffer, reducer, param


def test_one_parameter_without_padding_is_reduced_from_autograds_tensor():
    buffer, reducer, _ = staged_twice((8, 4))  # 32 elements: no padding at 2 ranks
    first = torch.arange(32.0).view(8, 4)
    reducer._stage(0, 0, first)
    assert buffer.flat_grad.data_ptr() == first.data_ptr()  # no copy
    assert reducer.full_grad_nbytes() == 32 * 4
    second = torch.ones(8, 4)
    reducer._stage(0, 0, second)  # the same step's second gradient
    torch.testing.assert_close(first, torch.arange(32.0).view(8, 4), rtol=0, atol=0)
    assert buffer.flat_grad.data_ptr() != first.data_ptr()
    torch.testing.assert_close(buffer.flat_grad, torch.arange(32.0) + 1, rtol=0, atol=0)
    reducer.reset()
    assert buffer.flat_grad is None and reducer.full_grad_nbytes() == 0


def test_a_padded_buffer_copies():
    buffer, reducer, _ = staged_twice((5, 4))  # 20 elements, padded to 32
    grad = torch.ones(5, 4)
    reducer._stage(0, 0, grad)
    assert buffer.flat_grad.data_ptr() != grad.data_ptr()
    torch.testing.assert_close(buffer.grad_views[0], grad, rtol=0, atol=0)
