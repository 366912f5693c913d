"""shardadam.rules.adagrad against Keras 3's Adagrad (torch backend), step by step."""

from __future__ import annotations

import re

import pytest
import torch

from shardadam.rules import adagrad
from tests.unit.rules.keras_driver import assert_matches_keras

LR = 0.05  # Adagrad's steps shrink as the accumulator grows: a larger lr keeps them visible

ALONE = [
    {"initial_accumulator_value": 0.0},  # the first step is then lr * sign(g), nearly
    {"initial_accumulator_value": 2.5},
    {"epsilon": 1e-3},
    {"epsilon": 0.0},  # safe while the accumulator starts above 0
]
COMBINED = {"initial_accumulator_value": 0.01, "epsilon": 1e-5}


@pytest.mark.parametrize("compiled", [False, True])
def test_defaults(compiled):
    assert_matches_keras(adagrad, {}, LR, compiled=compiled)


def test_defaults_at_keras_learning_rate():
    assert_matches_keras(adagrad, {}, adagrad.LEARNING_RATE, seed=3)


@pytest.mark.parametrize("hp", ALONE, ids=str)
def test_each_argument_alone(hp):
    assert_matches_keras(adagrad, hp, LR, seed=1)


@pytest.mark.parametrize("compiled", [False, True])
def test_combination(compiled):
    assert_matches_keras(adagrad, COMBINED, LR, compiled=compiled, seed=4)


@pytest.mark.parametrize("shape", [(), (1,), (13,)], ids=str)
def test_shapes(shape):
    assert_matches_keras(adagrad, COMBINED, LR, shape=shape, seed=2)


@pytest.mark.parametrize("initial", [0.1, 0.0, 2.5])
def test_slots_are_keras_variables(initial):
    import keras

    optimizer = keras.optimizers.Adagrad(initial_accumulator_value=initial)
    optimizer.build([keras.Variable([1.0, 2.0], name="w")])
    per_element = {
        v.name.removeprefix("w_"): float(keras.ops.convert_to_numpy(v)[0])
        for v in optimizer.variables
        if v.name.startswith("w_")
    }
    hp = {**adagrad.HYPERPARAMETERS, "initial_accumulator_value": initial}
    slots = adagrad.slots(hp)
    assert slots == {"accumulator": initial}
    as_float32 = {name: float(torch.tensor(value)) for name, value in slots.items()}
    assert as_float32 == per_element  # Keras's variable holds the float32 rounding
    assert adagrad.static(hp) == ()


BAD = [
    ("initial_accumulator_value", -0.1, ValueError),
    ("initial_accumulator_value", float("nan"), ValueError),
    ("initial_accumulator_value", float("inf"), ValueError),
    ("initial_accumulator_value", True, TypeError),
    ("initial_accumulator_value", "0.1", TypeError),
    ("epsilon", -1e-7, ValueError),
    ("epsilon", float("inf"), ValueError),
    ("epsilon", None, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD, ids=str)
def test_check_refuses(name, value, error):
    hp = {**adagrad.HYPERPARAMETERS, name: value}
    shown = str(value) if error is ValueError else repr(value)
    pattern = rf"^Invalid {name} \(param group 1\): {re.escape(shown)} \(expected .+\)$"
    with pytest.raises(error, match=pattern):
        adagrad.check(hp, " (param group 1)")


def test_check_refuses_zero_accumulator_with_zero_epsilon():
    hp = {"initial_accumulator_value": 0.0, "epsilon": 0}
    with pytest.raises(ValueError, match=r"initial_accumulator_value and epsilon.*both 0"):
        adagrad.check(hp)


def test_check_accepts_edges():
    adagrad.check({"initial_accumulator_value": 0, "epsilon": 1e-10})
    adagrad.check({"initial_accumulator_value": 1e-3, "epsilon": 0})
