"""shardadam.rules.adamax against Keras 3's Adamax (torch backend), step by step."""

from __future__ import annotations

import re

import pytest

from shardadam.rules import adamax
from tests.unit.rules.keras_driver import assert_matches_keras

LR = 0.05  # Keras's 0.001 barely moves the weights in 50 steps

ALONE = [
    {"beta_1": 0.5},
    {"beta_1": 0.0},
    {"beta_2": 0.9},
    {"beta_2": 0.0},
    {"epsilon": 1e-3},
]
COMBINED = {"beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-4}


@pytest.mark.parametrize("compiled", [False, True])
def test_defaults(compiled):
    assert_matches_keras(adamax, {}, LR, compiled=compiled)


@pytest.mark.parametrize("hp", ALONE, ids=str)
def test_each_argument_alone(hp):
    assert_matches_keras(adamax, hp, LR)


@pytest.mark.parametrize("compiled", [False, True])
def test_combination(compiled):
    assert_matches_keras(adamax, COMBINED, LR, shape=(13,), compiled=compiled, seed=1)


@pytest.mark.parametrize("shape", [(), (1,), (13,)], ids=str)
def test_shapes(shape):
    assert_matches_keras(adamax, COMBINED, LR, shape=shape, seed=2)


def test_slots_are_keras_variables():
    import keras

    optimizer = keras.optimizers.Adamax()
    optimizer.build([keras.Variable([1.0, 2.0], name="w")])
    per_element = {
        v.name.removeprefix("w_"): float(keras.ops.convert_to_numpy(v)[0])
        for v in optimizer.variables
        if v.name.startswith("w_")
    }
    assert adamax.slots(adamax.HYPERPARAMETERS) == per_element == {"momentum": 0.0, "norm": 0.0}
    assert adamax.static(adamax.HYPERPARAMETERS) == ()


BAD = [
    ("beta_1", -0.1, ValueError),
    ("beta_1", 1.0, ValueError),
    ("beta_1", True, TypeError),
    ("beta_1", "0.9", TypeError),
    ("beta_2", 1.5, ValueError),
    ("beta_2", None, TypeError),
    ("epsilon", -1e-7, ValueError),
    ("epsilon", float("nan"), ValueError),
    ("epsilon", float("inf"), ValueError),
    ("epsilon", False, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD, ids=str)
def test_check_refuses(name, value, error):
    hp = {**adamax.HYPERPARAMETERS, name: value}
    shown = repr(value) if isinstance(value, str) else str(value)
    pattern = rf"^Invalid {name} \(param group 1\): {re.escape(shown)} \(expected .+\)$"
    with pytest.raises(error, match=pattern):
        adamax.check(hp, " (param group 1)")


def test_check_accepts_edges_and_callables():
    adamax.check({"beta_1": 0.0, "beta_2": 0, "epsilon": 0.0})
    adamax.check({**adamax.HYPERPARAMETERS, "beta_1": lambda: 0.9})
