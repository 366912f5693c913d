"""Row and column statistics of tensors cut by shard boundaries, and where a factored rule's
state of them lives (Note [factored state]).

Note [factored state]
    A factored rule (Adafactor) keeps, for each tensor of 2+ dims of shape [..., R, C], one
    value per row (shape[:-1], "r") and one per column of each matrix (shape[:-2] + [C],
    "c") instead of one per element. A rank's shard is a contiguous range of the flat buffer,
    so it touches a contiguous range of each tensor's rows and of its matrices; the rank keeps
    exactly those entries: its rows, and the C columns of each matrix it touches. That is
    about 1/world_size of r, and of c for a tensor of many matrices; a 2-D tensor has one
    matrix, whose C column values each rank touching it keeps (C is 1/R of the tensor). A
    row or matrix that a shard boundary cuts is kept by each of its ranks, identical on all:
    each computes it from the same sums. A step sums the rule's elementwise terms over each
    row and column of the rank's pieces; the entries that other ranks also touch (found from
    the layout, the same list on every rank) go into one small all-reduce. A mean over each
    matrix's rows of a row value works the same way, with each row counted by the rank that
    holds its first element.
"""

from __future__ import annotations

import dataclasses
import functools
from math import prod

import torch
from torch import Tensor

from .buffers import FlatBuffer
from .comm import Communicator
from .layout import BufferLayout, Range, complement

ROWS, COLUMNS = "r", "c"
"""The two kinds of factored state, under the names of Keras's Adafactor variables."""

FACTORED_ROWS = ("estimate", "factored")
"""What the engine hands a factored rule's terms and update per element, as the first rows of
its ``factors``: the product of the element's row and column values, and 1 where the element
belongs to a factored tensor (0 elsewhere)."""


def is_factored(shape: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` has factored state: 2+ dims and any elements."""
    return len(shape) >= 2 and prod(shape) > 0


def factored_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The shapes of a tensor's row and column state."""
    return {ROWS: tuple(shape[:-1]), COLUMNS: tuple(shape[:-2]) + tuple(shape[-1:])}


def touched(shape: tuple[int, ...], elements: Range) -> dict[str, Range]:
    """The entries of the row and column state (flattened) that ``elements`` of the
    flattened tensor belong to: what a rank holding those elements keeps."""
    cols, per_matrix = shape[-1], shape[-1] * shape[-2]
    first_matrix, end_matrix = elements.start // per_matrix, (elements.end - 1) // per_matrix + 1
    return {
        ROWS: Range(elements.start // cols, (elements.end - 1) // cols + 1),
        COLUMNS: Range(first_matrix * cols, end_matrix * cols),
    }


def owned(shape: tuple[int, ...], elements: Range) -> dict[str, Range]:
    """The entries a rank holding ``elements`` writes to a checkpoint: the rows and matrices
    whose first element is among them, so that every entry is written by one rank."""
    cols, per_matrix = shape[-1], shape[-1] * shape[-2]

    def first_in(size: int) -> Range:
        return Range(-(-elements.start // size), -(-elements.end // size))

    rows, matrices = first_in(cols), first_in(per_matrix)
    return {ROWS: rows, COLUMNS: Range(matrices.start * cols, matrices.end * cols)}


@dataclasses.dataclass(frozen=True)
class FactoredPiece:
    """The part of one factored tensor in a rank's shard, and where its entries sit in the
    rank's row, column and matrix vectors."""

    param_index: int
    shape: tuple[int, ...]
    elements: Range
    """Elements of the flattened tensor."""
    local: Range
    """The same elements, in shard coordinates."""
    rows: Range
    """Entries of the rank's row vector (the tensor's rows ``touched``)."""
    columns: Range
    """Entries of the rank's column vector."""
    matrices: Range
    """Entries of the rank's matrix vector (one per matrix touched)."""

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def lead(self) -> int:
        """Elements of the first touched row before the piece starts."""
        return self.elements.start % self.cols

    @property
    def whole(self) -> bool:
        return self.elements.numel == prod(self.shape)


class FactoredLayout:
    """Where the row, column and matrix entries of this rank's factored pieces sit, and which
    are shared with other ranks (Note [factored state]). Plain data from the buffer layout."""

    def __init__(self, layout: BufferLayout, rank: int, device: torch.device) -> None:
        self.pieces: list[FactoredPiece] = []
        counts = {"rows": 0, "columns": 0, "matrices": 0}
        for piece in layout.pieces(rank):
            shape = layout.params[piece.param_index].shape
            if not is_factored(shape):
                continue
            entries = touched(shape, piece.param)
            sizes = {
                "rows": entries[ROWS].numel,
                "columns": entries[COLUMNS].numel,
                "matrices": entries[COLUMNS].numel // shape[-1],
            }
            spans = {k: Range(counts[k], counts[k] + n) for k, n in sizes.items()}
            self.pieces.append(
                FactoredPiece(piece.param_index, shape, piece.param, piece.local, **spans)
            )
            counts = {k: counts[k] + n for k, n in sizes.items()}
        self.numel = counts
        self._device = device
        self._mask: Tensor | None = None
        long = {"dtype": torch.long, "device": device}
        self._matrix_of_row = []
        self._owned_rows = []
        row_divisor, column_divisor = [], []
        for p in self.pieces:
            first_row = p.elements.start // p.cols
            rows = torch.arange(first_row, first_row + p.rows.numel, **long)
            first_matrix = p.elements.start // (p.cols * p.shape[-2])
            self._matrix_of_row.append(
                torch.div(rows, p.shape[-2], rounding_mode="floor") - first_matrix
            )
            self._owned_rows.append(slice(1 if p.lead else 0, p.rows.numel))
            row_divisor.append(float(p.cols))
            column_divisor.append(float(p.shape[-2]))
        self._row_divisor = row_divisor
        self._column_divisor = column_divisor
        self.shared = _shared_entries(layout, rank, self, device)

    def row_col_sums(self, terms: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's sums of the elementwise ``terms`` (``[shard numel]``) over each row and
        each column of its pieces (partial where a boundary cuts a row or a matrix)."""
        rows = terms.new_zeros(self.numel["rows"])
        columns = terms.new_zeros(self.numel["columns"])
        for p, matrix_of_row in zip(self.pieces, self._matrix_of_row):
            grid = self._grid(p, terms[p.local.slice])
            rows[p.rows.slice] = grid.sum(1)
            if p.matrices.numel == 1:
                columns[p.columns.slice] = grid.sum(0)
            else:
                columns[p.columns.slice].view(-1, p.cols).index_add_(0, matrix_of_row, grid)
        return rows, columns

    def means(self, row_sums: Tensor, column_sums: Tensor) -> tuple[Tensor, Tensor]:
        """Complete sums made means: a row's over its C elements, a column's over its R."""
        rows, columns = row_sums.clone(), column_sums.clone()
        for p, r_div, c_div in zip(self.pieces, self._row_divisor, self._column_divisor):
            rows[p.rows.slice] /= r_div
            columns[p.columns.slice] /= c_div
        return rows, columns

    def matrix_sums(self, row_values: Tensor) -> Tensor:
        """This rank's sums of ``row_values`` over the rows of each matrix it touches, each row
        counted by the rank holding its first element (partial where a matrix is shared)."""
        sums = row_values.new_zeros(self.numel["matrices"])
        for p, matrix_of_row, mine in zip(self.pieces, self._matrix_of_row, self._owned_rows):
            values = row_values[p.rows.slice][mine]
            sums[p.matrices.slice].index_add_(0, matrix_of_row[mine], values)
        return sums

    def per_row(self, matrix_sums: Tensor) -> Tensor:
        """Each row's mean of its matrix's rows, from the (complete) ``matrix_sums``."""
        out = matrix_sums.new_empty(self.numel["rows"])
        for p, matrix_of_row, c_div in zip(self.pieces, self._matrix_of_row, self._column_divisor):
            out[p.rows.slice] = matrix_sums[p.matrices.slice][matrix_of_row] / c_div
        return out

    def outer(self, row_values: Tensor, column_values: Tensor, out: Tensor) -> Tensor:
        """``out`` (``[shard numel]``): each element of a factored piece gets its row's value
        times its column's value; other elements 0."""
        for p, matrix_of_row in zip(self.pieces, self._matrix_of_row):
            rows = row_values[p.rows.slice].unsqueeze(1)
            columns = column_values[p.columns.slice].view(-1, p.cols)
            if p.matrices.numel > 1:
                columns = columns[matrix_of_row]
            target = out[p.local.slice]
            if p.lead == 0 and p.local.numel == p.rows.numel * p.cols:  # whole rows: no copy
                torch.mul(rows, columns, out=target.view(-1, p.cols))
            else:
                target.copy_((rows * columns).view(-1)[p.lead : p.lead + p.local.numel])
        for gap in complement([p.local for p in self.pieces], out.numel()):
            out[gap.slice] = 0
        return out

    def mask(self, numel: int, dtype: torch.dtype) -> Tensor:
        """``[numel]``: 1 on the elements of factored pieces, 0 elsewhere (kept: read only)."""
        if self._mask is None or self._mask.numel() != numel or self._mask.dtype != dtype:
            self._mask = torch.zeros(numel, dtype=dtype, device=self._device)
            for p in self.pieces:
                self._mask[p.local.slice] = 1
        return self._mask

    def keep_(self, absent: set[int], new: Tensor, old: Tensor, kind: str) -> None:
        """Give the entries of the pieces of parameters in ``absent`` (no gradient this step)
        their ``old`` values back in ``new``: they are not updated (Keras skips them)."""
        for p in self.pieces:
            if p.param_index in absent:
                span = getattr(p, kind).slice
                new[span] = old[span]

    def _grid(self, p: FactoredPiece, values: Tensor) -> Tensor:
        """The piece's values as ``[rows touched, C]``, zeros before and after it."""
        if p.lead == 0 and values.numel() == p.rows.numel * p.cols:
            return values.view(-1, p.cols)
        grid = values.new_zeros(p.rows.numel * p.cols)
        grid[p.lead : p.lead + values.numel()] = values
        return grid.view(-1, p.cols)


@dataclasses.dataclass
class _Shared:
    """Entries of a rank's vectors that other ranks also hold: local positions, and their
    positions in a vector laid out the same on every rank."""

    local: dict[str, Tensor]
    position: dict[str, Tensor]
    size: dict[str, int]


def _shared_entries(
    layout: BufferLayout, rank: int, mine: FactoredLayout, device: torch.device
) -> _Shared:
    """The rows and matrices of each factored tensor that two or more ranks touch (a shard
    boundary inside them), numbered in buffer order, the same on every rank."""
    spans: dict[int, dict[int, dict[str, Range]]] = {}  # param -> rank -> touched entries
    for r in range(layout.world_size):
        for piece in layout.pieces(r):
            shape = layout.params[piece.param_index].shape
            if is_factored(shape):
                spans.setdefault(piece.param_index, {})[r] = touched(shape, piece.param)
    shared = {"rows": [], "matrices": []}  # (param, entry) in order
    for index, by_rank in sorted(spans.items()):
        cols = layout.params[index].shape[-1]
        ranges = [by_rank[r] for r in sorted(by_rank)]
        for before, after in zip(ranges, ranges[1:]):
            if before[ROWS].end - 1 == after[ROWS].start:
                shared["rows"].append((index, after[ROWS].start))
            if before[COLUMNS].end - cols == after[COLUMNS].start:
                shared["matrices"].append((index, after[COLUMNS].start // cols))
    numbered = {k: {e: i for i, e in enumerate(dict.fromkeys(v))} for k, v in shared.items()}
    local = {"rows": [], "columns": [], "matrices": []}
    position = {"rows": [], "columns": [], "matrices": []}
    column_start, column_offset = {}, 0
    for index, m in numbered["matrices"]:
        column_start[(index, m)] = column_offset
        column_offset += layout.params[index].shape[-1]
    pieces = {p.param_index: p for p in mine.pieces}
    # Only the shared entries are visited (a few per boundary), not every row of every piece.
    for (index, row), i in numbered["rows"].items():
        p = pieces.get(index)
        first = None if p is None else p.elements.start // p.cols
        if p is not None and first <= row < first + p.rows.numel:
            local["rows"].append(p.rows.start + row - first)
            position["rows"].append(i)
    for (index, m), i in numbered["matrices"].items():
        p = pieces.get(index)
        first = None if p is None else p.elements.start // (p.cols * p.shape[-2])
        if p is not None and first <= m < first + p.matrices.numel:
            local["matrices"].append(p.matrices.start + m - first)
            position["matrices"].append(i)
            base = p.columns.start + (m - first) * p.cols
            local["columns"] += range(base, base + p.cols)
            start = column_start[(index, m)]
            position["columns"] += range(start, start + p.cols)
    as_tensor = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in local.items()}
    positions = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in position.items()}
    sizes = {"rows": len(numbered["rows"]), "columns": column_offset,
             "matrices": len(numbered["matrices"])}  # fmt: skip
    return _Shared(as_tensor, positions, sizes)


class FactoredStatistics:
    """The row, column and matrix statistics of ``buffers``' factored pieces across the ranks
    of ``comm``, one small all-reduce for all buffers per call (Note [factored state])."""

    def __init__(self, comm: Communicator, buffers: list[FlatBuffer]) -> None:
        self.comm = comm
        self.buffers = buffers  # the optimizer's list: buffers added later are covered too
        self._layouts: list[FactoredLayout] = []

    def layout(self, b: int) -> FactoredLayout:
        while len(self._layouts) <= b:
            buffer = self.buffers[len(self._layouts)]
            self._layouts.append(FactoredLayout(buffer.layout, self.comm.rank, buffer.device))
        return self._layouts[b]

    def new_state(self, b: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """Zeroed row and column state of buffer ``b``'s factored pieces."""
        layout, device = self.layout(b), self.buffers[b].device
        return {
            ROWS: torch.zeros(layout.numel["rows"], dtype=dtype, device=device),
            COLUMNS: torch.zeros(layout.numel["columns"], dtype=dtype, device=device),
        }

    def row_col_means(self, terms: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Collective when sharded: per buffer, the means of ``terms[b]`` (``[shard numel]``)
        over each row and column of its factored pieces, whole tensors' on every rank."""
        sums = [self.layout(b).row_col_sums(t) for b, t in enumerate(terms)]
        flat = [s for pair in sums for s in pair]
        layouts = [self.layout(b) for b in range(len(terms)) for _ in range(2)]
        self._complete_(flat, layouts, ["rows", "columns"] * len(terms))
        return [self.layout(b).means(*pair) for b, pair in enumerate(sums)]

    def matrix_means(self, row_values: list[Tensor]) -> list[Tensor]:
        """Collective when sharded: per buffer, each row's mean of ``row_values[b]`` over the
        rows of its matrix."""
        sums = [self.layout(b).matrix_sums(v) for b, v in enumerate(row_values)]
        layouts = [self.layout(b) for b in range(len(sums))]
        self._complete_(sums, layouts, ["matrices"] * len(sums))
        return [self.layout(b).per_row(s) for b, s in enumerate(sums)]

    def _complete_(
        self, partial: list[Tensor], layouts: list[FactoredLayout], kinds: list[str]
    ) -> None:
        """Add the other ranks' partial sums of the shared entries (``partial[i]``: a vector of
        ``kinds[i]`` of ``layouts[i]``), in place; one all-reduce for all."""
        if not self.comm.active or not partial:
            return
        sizes = [layout.shared.size[k] for layout, k in zip(layouts, kinds)]
        if not any(sizes):
            return  # no boundary cuts a row or a matrix: every sum is whole already
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in partial])
        vector = partial[0].new_zeros(sum(sizes), dtype=dtype)  # float64 buffers stay exact
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        for values, layout, kind, offset in zip(partial, layouts, kinds, offsets):
            shared = layout.shared
            vector[shared.position[kind] + offset] = values[shared.local[kind]].to(dtype)
        self.comm.all_reduce_sum_(vector)
        for values, layout, kind, offset in zip(partial, layouts, kinds, offsets):
            shared = layout.shared
            values[shared.local[kind]] = vector[shared.position[kind] + offset].to(values.dtype)
