"""Layout invariants: every element is owned by exactly one rank, shards are equal and aligned."""

from __future__ import annotations

import random
from math import prod

import pytest

from shardadam.layout import Range, build_layout


@pytest.mark.parametrize("seed", range(20))
def test_every_element_owned_once_for_any_world_size(seed):
    rng = random.Random(seed)
    shapes = [
        tuple(rng.randint(1, 9) for _ in range(rng.randint(0, 3)))
        for _ in range(rng.randint(1, 12))
    ]
    names = [f"p{i}" for i in range(len(shapes))]
    for world_size in (1, 2, 3, 4, 7):
        align = rng.choice([1, 4, 16])
        layout = build_layout(shapes, names, world_size, align)
        assert layout.shard_numel % align == 0
        assert layout.padded_numel >= sum(prod(s) for s in shapes)
        for span in layout.params:
            assert span.flat.start % align == 0
            assert span.flat.numel == prod(span.shape)
        for a, b in zip(layout.params, layout.params[1:]):
            assert a.flat.end <= b.flat.start
        covered = sorted(
            [s.flat for s in layout.params] + list(layout.padding()), key=lambda r: r.start
        )
        assert covered[0].start == 0 and covered[-1].end == layout.padded_numel
        assert all(a.end == b.start for a, b in zip(covered, covered[1:]))
        owned = {(span.index, e): 0 for span in layout.params for e in range(span.flat.numel)}
        for rank in range(world_size):
            shard = layout.shard(rank)
            assert shard.numel == layout.shard_numel
            for piece in layout.pieces(rank):
                span = layout.params[piece.param_index]
                assert piece.param.numel == piece.local.numel
                # Local coordinates point at the same flat elements as parameter coordinates.
                assert piece.local.start + shard.start == piece.param.start + span.flat.start
                for e in range(piece.param.start, piece.param.end):
                    owned[(span.index, e)] += 1
        assert set(owned.values()) == {1}


def test_layout_is_printable_and_rejects_bad_input():
    layout = build_layout([(3, 5), (7,)], ["w", "b"], 2, 4)
    table = layout.describe()
    assert "w" in table and "(3, 5)" in table and "padded to 24 = 2 x 12" in table
    assert layout.pieces(1)[0].param == Range(12, 15)
    with pytest.raises(ValueError, match="Invalid world_size: 0"):
        build_layout([(2,)], ["w"], 0)
    with pytest.raises(ValueError, match="Invalid rank: 2"):
        layout.shard(2)
