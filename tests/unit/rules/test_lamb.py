"""shardadam.rules.lamb against Keras 3's Lamb (torch backend), step by step on one tensor.

Across shards, where the trust ratio's norms have partial sums on several ranks, the family
tests compare the whole optimizer (tests/unit/test_family_keras.py and tests/distributed).
"""

from __future__ import annotations

import pytest
import torch

from shardadam.layout import Range
from shardadam.rules import lamb
from shardadam.tensor_stats import TensorStatistics
from tests.unit.rules.keras_driver import assert_matches_keras

LR = 0.01

ALONE = [{"beta_1": 0.5}, {"beta_1": 0.0}, {"beta_2": 0.9}, {"epsilon": 1e-3}]
COMBINED = {"beta_1": 0.7, "beta_2": 0.95, "epsilon": 1e-5}


@pytest.mark.parametrize("compiled", [False, True])
def test_defaults(compiled):
    assert_matches_keras(lamb, {}, LR, compiled=compiled)


@pytest.mark.parametrize("hp", ALONE, ids=str)
def test_each_argument_alone(hp):
    assert_matches_keras(lamb, hp, LR)


@pytest.mark.parametrize("compiled", [False, True])
def test_combination(compiled):
    assert_matches_keras(lamb, COMBINED, LR, shape=(13,), compiled=compiled, seed=1)


@pytest.mark.parametrize("shape", [(), (1,), (13,), (3, 1, 4)], ids=str)
def test_shapes(shape):
    assert_matches_keras(lamb, COMBINED, LR, shape=shape, seed=2)


def test_trust_ratio_is_one_where_a_norm_is_zero():
    """Keras's ratio: ||w|| / ||u||, and 1 where either is 0 (zero weights, a zero update)."""
    sums = torch.tensor([[4.0, 0.0, 9.0, 0.0], [1.0, 4.0, 0.0, 0.0]])
    scalars = lamb.scalars(lamb.HYPERPARAMETERS, torch.tensor(LR), 1, torch.float32)
    ratio = lamb.tensor_factors(sums, torch.full((4,), 3.0), scalars, ())
    torch.testing.assert_close(ratio, torch.tensor([[2.0, 1.0, 1.0, 1.0]]), rtol=0, atol=0)


@pytest.mark.parametrize("name, value, allowed", [
    ("beta_1", 1.0, "expected 0 <= beta_1"),
    ("beta_2", -0.1, "expected 0 <= beta_2"),
    ("epsilon", -1e-7, "epsilon"),
])  # fmt: skip
def test_bad_arguments_name_themselves(name, value, allowed):
    with pytest.raises(ValueError, match=name) as error:
        lamb.check({**lamb.HYPERPARAMETERS, name: value}, " (param group 1)")
    assert allowed in str(error.value) and "(param group 1)" in str(error.value)


class _Piece:
    def __init__(self, param_index, start, end):
        self.param_index = param_index
        self.local = Range(start, end)


class _Buffer:
    """What TensorStatistics reads of a FlatBuffer: its pieces and shard size."""

    def __init__(self, n_params, pieces, shard_numel):
        self.params = [None] * n_params
        self.pieces = [_Piece(*p) for p in pieces]
        self.piece_param_index = torch.tensor([p[0] for p in pieces])
        self.shard = type("S", (), {"numel": shard_numel})()


def test_tensor_statistics_sum_each_tensor_and_give_each_element_its_own():
    """One process: sums land at their tensor's index (0 for a tensor without a piece here),
    and every element receives its own tensor's value, padding 0."""
    buffers = [_Buffer(3, [(0, 0, 2), (2, 2, 5)], 6), _Buffer(1, [(0, 0, 3)], 3)]
    comm = type("C", (), {"all_reduce_sum_": staticmethod(lambda t: None)})()
    stats = TensorStatistics(comm, buffers)
    terms = [torch.arange(12.0).reshape(2, 6), torch.ones(2, 3)]
    first, second = stats.sum_per_tensor(terms)
    torch.testing.assert_close(first, torch.tensor([[1.0, 0.0, 9.0], [13.0, 0.0, 27.0]]))
    torch.testing.assert_close(second, torch.tensor([[3.0], [3.0]]))
    expanded = stats.per_element(buffers[0], torch.tensor([[10.0, 20.0, 30.0]]))
    torch.testing.assert_close(expanded, torch.tensor([[10.0, 10.0, 30.0, 30.0, 30.0, 0.0]]))
