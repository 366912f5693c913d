"""Which rank owns which elements of a flat parameter buffer.

A layout is plain data: a pure function of the parameters' shapes, the world size and the
alignment, identical on every rank and computable without a process group.

Note [equal shard sizes]
    The flat buffer is padded so that it splits into ``world_size`` shards of one size, each a
    multiple of ``align_numel``. Equal shards let reduce-scatter and all-gather work on plain
    flat tensors (gloo aborts on uneven inputs), and aligned shards keep vectorised kernels on
    their fast path. Padding elements hold zeros in every buffer and stay zero under the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class Range:
    """Half-open range [start, end) of element indices."""

    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start

    def intersect(self, other: Range) -> Range | None:
        start, end = max(self.start, other.start), min(self.end, other.end)
        return Range(start, end) if start < end else None

    def shift(self, offset: int) -> Range:
        return Range(self.start + offset, self.end + offset)

    @property
    def slice(self) -> slice:
        return slice(self.start, self.end)


@dataclass(frozen=True)
class ParamSpan:
    """Where one parameter lives in its flat buffer."""

    index: int
    """Position of the parameter among the buffer's parameters."""
    name: str
    shape: tuple[int, ...]
    flat: Range
    """Elements of the flat buffer that hold the parameter (row-major)."""


@dataclass(frozen=True)
class ShardPiece:
    """The part of one parameter that lies in one rank's shard."""

    param_index: int
    param: Range
    """Elements of the flattened parameter."""
    local: Range
    """The same elements, counted from the start of the rank's shard."""


@dataclass(frozen=True)
class BufferLayout:
    """Placement of an ordered list of parameters in one flat buffer split over ranks."""

    params: tuple[ParamSpan, ...]
    world_size: int
    shard_numel: int
    align_numel: int

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.world_size

    @property
    def param_numel(self) -> int:
        return sum(span.flat.numel for span in self.params)

    def padding(self) -> tuple[Range, ...]:
        """The ranges of the flat buffer that belong to no parameter."""
        gaps, offset = [], 0
        for span in self.params:
            if span.flat.start > offset:
                gaps.append(Range(offset, span.flat.start))
            offset = span.flat.end
        if self.padded_numel > offset:
            gaps.append(Range(offset, self.padded_numel))
        return tuple(gaps)

    def shard(self, rank: int) -> Range:
        """Elements of the flat buffer owned by ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"Invalid rank: {rank} (expected 0 <= rank < {self.world_size})")
        return Range(rank * self.shard_numel, (rank + 1) * self.shard_numel)

    def pieces(self, rank: int) -> tuple[ShardPiece, ...]:
        """The pieces of parameters inside ``rank``'s shard, in buffer order."""
        shard = self.shard(rank)
        pieces = []
        for span in self.params:
            overlap = span.flat.intersect(shard)
            if overlap is not None:
                pieces.append(
                    ShardPiece(
                        param_index=span.index,
                        param=overlap.shift(-span.flat.start),
                        local=overlap.shift(-shard.start),
                    )
                )
        return tuple(pieces)

    def describe(self) -> str:
        """A table of the layout, for people debugging it."""
        lines = [
            f"BufferLayout: {len(self.params)} params, {self.param_numel} elements, "
            f"padded to {self.padded_numel} = {self.world_size} x {self.shard_numel}",
            f"{'index':>5}  {'name':<40} {'shape':<18} {'flat_start':>10} {'flat_end':>10}  ranks",
        ]
        for span in self.params:
            ranks = [
                r for r in range(self.world_size) if span.flat.intersect(self.shard(r)) is not None
            ]
            lines.append(
                f"{span.index:>5}  {span.name:<40} {str(span.shape):<18} "
                f"{span.flat.start:>10} {span.flat.end:>10}  {ranks}"
            )
        return "\n".join(lines)


def complement(ranges: list[Range], numel: int) -> list[Range]:
    """The parts of [0, numel) outside the sorted, disjoint ``ranges``."""
    gaps, offset = [], 0
    for r in ranges:
        if r.start > offset:
            gaps.append(Range(offset, r.start))
        offset = r.end
    if numel > offset:
        gaps.append(Range(offset, numel))
    return gaps


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_layout(
    shapes: list[tuple[int, ...]],
    names: list[str],
    world_size: int,
    align_numel: int = 16,
) -> BufferLayout:
    """Place parameters one after another, each start aligned, and pad into equal shards.

    See Note [equal shard sizes].
    """
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size} (expected world_size >= 1)")
    if len(shapes) != len(names):
        raise ValueError(f"got {len(shapes)} shapes but {len(names)} names")
    spans = []
    offset = 0
    for index, (shape, name) in enumerate(zip(shapes, names)):
        offset = _round_up(offset, align_numel)
        numel = prod(shape)
        spans.append(ParamSpan(index, name, tuple(shape), Range(offset, offset + numel)))
        offset += numel
    shard_numel = _round_up(max(_round_up(offset, world_size) // world_size, 1), align_numel)
    return BufferLayout(tuple(spans), world_size, shard_numel, align_numel)
