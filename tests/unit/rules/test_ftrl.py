"""shardadam.rules.ftrl against Keras 3's Ftrl (its generic update_step), step by step."""

from __future__ import annotations

import re

import pytest
import torch

from shardadam.rules import ftrl
from tests.unit.rules.keras_driver import assert_matches_keras

LR = 0.1  # Keras's 0.001 leaves the weights near 0 (the overwrite divides by n^-p / lr)

ALONE = [
    {"learning_rate_power": -0.3},
    {"learning_rate_power": 0.0},
    {"learning_rate_power": -1.0},
    {"initial_accumulator_value": 0.5},
    {"l1_regularization_strength": 0.1},
    {"l2_regularization_strength": 0.2},
    {"l2_shrinkage_regularization_strength": 0.05},
    {"beta": 0.3},
]
COMBINED = {
    "learning_rate_power": -0.3,
    "initial_accumulator_value": 0.5,
    "l1_regularization_strength": 0.1,
    "l2_regularization_strength": 0.2,
    "l2_shrinkage_regularization_strength": 0.05,
    "beta": 0.3,
}


@pytest.mark.parametrize("compiled", [False, True])
def test_defaults(compiled):
    assert_matches_keras(ftrl, {}, LR, compiled=compiled)


@pytest.mark.parametrize("hp", ALONE, ids=str)
def test_each_argument_alone(hp):
    assert_matches_keras(ftrl, hp, LR)


@pytest.mark.parametrize("compiled", [False, True])
def test_combination(compiled):
    assert_matches_keras(ftrl, COMBINED, 0.5, shape=(13,), compiled=compiled, seed=1)


def test_zero_initial_accumulator_with_l2():
    assert_matches_keras(
        ftrl, {"initial_accumulator_value": 0.0, "l2_regularization_strength": 0.1}, LR
    )


@pytest.mark.parametrize("shape", [(), (1,), (13,)], ids=str)
def test_shapes(shape):
    assert_matches_keras(ftrl, COMBINED, 0.5, shape=shape, seed=2)


def test_weights_are_overwritten():
    """Without shrinkage and with a fixed rate (sigma = 0), the new weight does not depend on
    the old one: it is a function of the accumulator and the linear term."""
    hp = {**ftrl.HYPERPARAMETERS, "learning_rate_power": 0.0, "l1_regularization_strength": 0.1}
    packed = ftrl.scalars(hp, torch.tensor(LR), 1, torch.float32)
    grad = torch.tensor([0.05, -2.0, 3.0])
    results = []
    for start in (torch.zeros(3), torch.tensor([5.0, -7.0, 1.0])):
        slots = tuple(torch.full((3,), v) for v in ftrl.slots(hp).values())
        weights = start.clone()
        ftrl.update_(weights, grad.clone(), slots, packed.tolist(), ())
        results.append(weights)
    assert torch.equal(results[0], results[1])
    assert results[0][0] == 0  # |z| = 0.05 < l1: the weight is exactly 0


def test_slots_are_keras_variables():
    import keras

    optimizer = keras.optimizers.Ftrl(initial_accumulator_value=0.25)
    optimizer.build([keras.Variable([1.0, 2.0], name="w")])
    per_element = {
        v.name.removeprefix("w_"): float(keras.ops.convert_to_numpy(v)[0])
        for v in optimizer.variables
        if v.name.startswith("w_")
    }
    hp = {**ftrl.HYPERPARAMETERS, "initial_accumulator_value": 0.25}
    assert ftrl.slots(hp) == per_element == {"accumulator": 0.25, "linear": 0.0}
    assert ftrl.static(hp) == ()


KERAS_REFUSES = [
    ("learning_rate_power", 0.5),
    ("initial_accumulator_value", -0.1),
    ("l1_regularization_strength", -0.1),
    ("l2_regularization_strength", -0.1),
    ("l2_shrinkage_regularization_strength", -0.1),
]
BAD = [(name, value, ValueError) for name, value in KERAS_REFUSES] + [
    ("beta", -0.1, ValueError),
    ("learning_rate_power", float("-inf"), ValueError),
    ("l1_regularization_strength", float("nan"), ValueError),
    ("beta", float("inf"), ValueError),
    ("initial_accumulator_value", True, TypeError),
    ("learning_rate_power", "-0.5", TypeError),
    ("l2_regularization_strength", None, TypeError),
    ("l2_shrinkage_regularization_strength", False, TypeError),
    ("beta", lambda: 0.0, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD, ids=str)
def test_check_refuses(name, value, error):
    hp = {**ftrl.HYPERPARAMETERS, name: value}
    shown = str(value) if isinstance(value, float) else repr(value)
    pattern = rf"^Invalid {name} \(param group 1\): {re.escape(shown)} \(expected .+\)$"
    with pytest.raises(error, match=pattern):
        ftrl.check(hp, " (param group 1)")


@pytest.mark.parametrize("name, value", KERAS_REFUSES, ids=str)
def test_keras_refuses_the_same(name, value):
    import keras

    with pytest.raises(ValueError, match=name):
        keras.optimizers.Ftrl(**{name: value})


def test_zero_accumulator_refused_where_it_divides_zero_by_zero():
    hp = {**ftrl.HYPERPARAMETERS, "initial_accumulator_value": 0.0}
    with pytest.raises(ValueError, match=r"^Invalid initial_accumulator_value: 0 \(expected"):
        ftrl.check(hp)
    ftrl.check({**hp, "l2_regularization_strength": 0.1})
    ftrl.check({**hp, "beta": 0.1})
    ftrl.check({**hp, "learning_rate_power": 0})
