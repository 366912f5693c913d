"""Rows and columns of tensors cut by shard boundaries (``shardadam.factored``): each rank's row,
column and matrix statistics equal those of the whole tensor, for shapes and world sizes where
boundaries cut rows, matrices, and a row held by three ranks. The ranks run as threads over an
in-memory all-reduce, so the real exchange code runs; the reference is the whole tensor."""

from __future__ import annotations

import threading
from math import prod

import pytest
import torch

from shardadam.buffers import FlatBuffer
from shardadam.factored import (
    FactoredStatistics,
    factored_shapes,
    is_factored,
    owned,
    touched,
)
from shardadam.layout import Range, build_layout

SHAPES = [(7,), (5, 3), (2, 3, 4), (1, 9), (9, 1), (), (3, 1, 2, 5), (4, 17), (2, 80)]
"""With a row of 80 elements that three ranks share at world size 5 (shards of ~70)."""


class ThreadComm:
    """An all-reduce among threads: what a process group does, in one process."""

    def __init__(self, rank: int, world_size: int, shared: dict) -> None:
        self.rank, self.world_size, self.shared = rank, world_size, shared
        self.active = world_size > 1

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        barrier, slots = self.shared["barrier"], self.shared["slots"]
        slots[self.rank] = tensor.clone()
        barrier.wait()
        total = sum(slots)
        barrier.wait()
        tensor.copy_(total)


def run_ranks(world_size, fn):
    shared = {"barrier": threading.Barrier(world_size), "slots": [None] * world_size}
    results, errors = [None] * world_size, []

    def body(rank):
        try:
            results[rank] = fn(ThreadComm(rank, world_size, shared))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            shared["barrier"].abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def whole_statistics(values, shape):
    """Per factored tensor: row means, column means, each row's matrix mean of the row means."""
    cols, rows = shape[-1], shape[-2]
    grid = values.reshape(-1, rows, cols)
    row_means = grid.mean(2)
    return (
        row_means.reshape(-1),
        grid.mean(1).reshape(-1),
        row_means.mean(1, keepdim=True).expand_as(row_means).reshape(-1),
    )


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("align", [1, 4])
def test_each_rank_holds_the_whole_tensors_statistics(world_size, align):
    gen = torch.Generator().manual_seed(world_size * 10 + align)
    values = [torch.rand(s, generator=gen) + 0.5 for s in SHAPES]
    layout = build_layout(SHAPES, [f"p{i}" for i in range(len(SHAPES))], world_size, align)

    def rank_fn(comm):
        params = [v.clone() for v in values]
        buffer = FlatBuffer(params, layout, comm.rank)
        stats = FactoredStatistics(comm, [buffer])
        terms = buffer.shard_param.clone()
        ((row_means, col_means),) = stats.row_col_means([terms])
        (matrix_means,) = stats.matrix_means([row_means])
        outer = torch.full((buffer.shard.numel,), float("nan"))  # each element written
        stats.layout(0).outer(row_means / matrix_means, col_means, out=outer)
        return stats.layout(0), row_means, col_means, matrix_means, outer, buffer.shard

    for fl, row_means, col_means, matrix_means, outer, shard in run_ranks(world_size, rank_fn):
        expected_outer = torch.zeros(shard.numel)
        for p in fl.pieces:
            rows, cols, mats = whole_statistics(values[p.param_index], p.shape)
            held = touched(p.shape, p.elements)
            first_row = held["r"].start
            torch.testing.assert_close(row_means[p.rows.slice], rows[held["r"].slice])
            torch.testing.assert_close(col_means[p.columns.slice], cols[held["c"].slice])
            torch.testing.assert_close(matrix_means[p.rows.slice], mats[held["r"].slice])
            grid = (rows / mats).reshape(-1, 1) * cols.reshape(-1, p.shape[-1]).repeat_interleave(
                p.shape[-2], 0
            )
            expected_outer[p.local.slice] = grid.reshape(-1)[p.elements.slice]
            assert first_row == p.elements.start // p.shape[-1]
        torch.testing.assert_close(outer, expected_outer)
        assert {p.param_index for p in fl.pieces} <= {
            i for i, s in enumerate(SHAPES) if is_factored(s)
        }


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4), (1, 9), (9, 1), (3, 1, 2, 5)], ids=str)
@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_owned_entries_cover_each_entry_once_and_lie_in_the_touched_ones(shape, world_size):
    """What the ranks write to a checkpoint covers every row and column entry exactly once."""
    numel = prod(shape)
    cuts = torch.linspace(0, numel, world_size + 1).round().long().tolist()
    for kind, kind_shape in factored_shapes(shape).items():
        seen = torch.zeros(prod(kind_shape), dtype=torch.int64)
        for start, end in zip(cuts, cuts[1:]):
            if end <= start:
                continue
            mine, held = (
                owned(shape, Range(start, end))[kind],
                touched(shape, Range(start, end))[kind],
            )
            assert held.start <= mine.start and mine.end <= held.end or mine.numel == 0
            seen[mine.slice] += 1
        assert torch.equal(seen, torch.ones_like(seen)), (kind, seen)
