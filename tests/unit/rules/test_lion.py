"""shardadam.rules.lion against Keras 3's Lion (torch backend), step by step."""

from __future__ import annotations

import re

import pytest
import torch

from shardadam.rules import lion
from tests.unit.rules.keras_driver import assert_matches_keras

LR = 0.01  # each step moves every element by lr (or 0): Keras's 0.001 is visible, 0.01 more

ALONE = [
    {"beta_1": 0.5},
    {"beta_1": 1.0},
    {"beta_2": 0.9},
    {"beta_2": 0.0},
]
COMBINED = {"beta_1": 0.7, "beta_2": 0.95}


@pytest.mark.parametrize("compiled", [False, True])
def test_defaults(compiled):
    assert_matches_keras(lion, {}, LR, compiled=compiled)


@pytest.mark.parametrize("hp", ALONE, ids=str)
def test_each_argument_alone(hp):
    assert_matches_keras(lion, hp, LR)


@pytest.mark.parametrize("compiled", [False, True])
def test_combination(compiled):
    assert_matches_keras(lion, COMBINED, LR, shape=(13,), compiled=compiled, seed=1)


@pytest.mark.parametrize("shape", [(), (1,), (13,)], ids=str)
def test_shapes(shape):
    assert_matches_keras(lion, COMBINED, LR, shape=shape, seed=2)


def test_sign_of_zero_does_not_move():
    """A zero direction (zero gradient on zero momentum) leaves the weight, as Keras does."""
    hp = lion.HYPERPARAMETERS
    packed = lion.scalars(hp, torch.tensor(LR), 1, torch.float32)
    weights = torch.tensor([0.5, 0.5, 0.5])
    grad = torch.tensor([0.0, 2.0, -3.0])
    expected = torch.tensor([0.5, 0.5 - LR, 0.5 + LR])
    new_weights, _ = lion.update(weights, grad, (torch.zeros(3),), packed, ())
    assert torch.equal(new_weights, expected)
    slots = (torch.zeros(3),)
    lion.update_(weights, grad, slots, packed.tolist(), ())
    assert torch.equal(weights, expected)
    assert torch.equal(slots[0], grad * torch.tensor(1.0 - 0.99))


def test_slots_are_keras_variables():
    import keras

    optimizer = keras.optimizers.Lion()
    optimizer.build([keras.Variable([1.0, 2.0], name="w")])
    per_element = {
        v.name.removeprefix("w_"): float(keras.ops.convert_to_numpy(v)[0])
        for v in optimizer.variables
        if v.name.startswith("w_")
    }
    assert lion.slots(lion.HYPERPARAMETERS) == per_element == {"momentum": 0.0}
    assert lion.static(lion.HYPERPARAMETERS) == ()


BAD = [
    ("beta_1", 0.0, ValueError),  # Keras refuses it too
    ("beta_1", -0.5, ValueError),  # Keras refuses it too
    ("beta_1", 1.5, ValueError),  # Keras refuses it too
    ("beta_1", float("nan"), ValueError),
    ("beta_1", True, TypeError),
    ("beta_1", "0.9", TypeError),
    ("beta_2", 1.0, ValueError),
    ("beta_2", -0.1, ValueError),
    ("beta_2", None, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD, ids=str)
def test_check_refuses(name, value, error):
    hp = {**lion.HYPERPARAMETERS, name: value}
    shown = repr(value) if isinstance(value, str) else str(value)
    pattern = rf"^Invalid {name} \(param group 1\): {re.escape(shown)} \(expected .+\)$"
    with pytest.raises(error, match=pattern):
        lion.check(hp, " (param group 1)")


@pytest.mark.parametrize("beta_1", [0.0, -0.5, 1.5])
def test_keras_refuses_the_same_beta_1(beta_1):
    import keras

    with pytest.raises(ValueError, match="beta_1"):
        keras.optimizers.Lion(beta_1=beta_1)


def test_check_accepts_edges_and_callables():
    lion.check({"beta_1": 1, "beta_2": 0.0})
    lion.check({"beta_1": torch.tensor(0.9), "beta_2": 0.99})
    lion.check({"beta_1": lambda: 0.9, "beta_2": lambda: 0.99})
