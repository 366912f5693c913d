"""shardadam.rules.nadam against Keras 3's Nadam (torch backend), step by step.

80 steps rather than 50: the product u_product keeps its float32 rounding from step to step,
and the schedule 0.96^t has settled by then.
"""

from __future__ import annotations

import re

import pytest
import torch

from shardadam.rules import nadam
from tests.unit.rules.keras_driver import assert_matches_keras

LR = 0.05  # Keras's 0.001 barely moves the weights
STEPS = 80

ALONE = [
    {"beta_1": 0.5},
    {"beta_1": 0.0},
    {"beta_2": 0.9},
    {"epsilon": 1e-3},
]
COMBINED = {"beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-4}


@pytest.mark.parametrize("compiled", [False, True])
def test_defaults(compiled):
    assert_matches_keras(nadam, {}, LR, steps=STEPS, compiled=compiled)


@pytest.mark.parametrize("hp", ALONE, ids=str)
def test_each_argument_alone(hp):
    assert_matches_keras(nadam, hp, LR, steps=STEPS)


@pytest.mark.parametrize("compiled", [False, True])
def test_combination(compiled):
    assert_matches_keras(nadam, COMBINED, LR, shape=(13,), steps=STEPS, compiled=compiled, seed=1)


@pytest.mark.parametrize("shape", [(), (1,), (13,)], ids=str)
def test_shapes(shape):
    assert_matches_keras(nadam, COMBINED, LR, shape=shape, steps=STEPS, seed=2)


def test_u_product_is_keras_bit_for_bit():
    """The carry advances as Keras's float32 variable does, once per applied step."""
    import keras

    hp = {**nadam.HYPERPARAMETERS, "beta_1": 0.85}
    optimizer = keras.optimizers.Nadam(learning_rate=LR, **hp)
    variable = keras.Variable(torch.ones(3))
    carry = {k: torch.tensor(v) for k, v in nadam.CARRY.items()}
    lr = torch.tensor(LR)
    for step in range(1, 121):
        optimizer.apply_gradients([(torch.full((3,), 0.1), variable)])
        _, carry = nadam.scalars(hp, lr, step, torch.float32, carry)
    keras_u_product = torch.as_tensor(keras.ops.convert_to_numpy(optimizer._u_product))
    assert torch.equal(carry["u_product"], keras_u_product)


def test_slots_are_keras_variables():
    import keras

    optimizer = keras.optimizers.Nadam()
    optimizer.build([keras.Variable([1.0, 2.0], name="w")])
    per_element = {
        v.name.removeprefix("w_"): float(keras.ops.convert_to_numpy(v)[0])
        for v in optimizer.variables
        if v.name.startswith("w_")
    }
    assert nadam.slots(nadam.HYPERPARAMETERS) == per_element == {"momentum": 0.0, "velocity": 0.0}
    assert nadam.CARRY == {"u_product": float(keras.ops.convert_to_numpy(optimizer._u_product))}
    assert nadam.static(nadam.HYPERPARAMETERS) == ()


BAD = [
    ("beta_1", -0.1, ValueError),
    ("beta_1", 1.0, ValueError),
    ("beta_1", True, TypeError),
    ("beta_1", "0.9", TypeError),
    ("beta_2", 1.0, ValueError),
    ("beta_2", None, TypeError),
    ("epsilon", -1e-7, ValueError),
    ("epsilon", float("nan"), ValueError),
    ("epsilon", float("inf"), ValueError),
    ("epsilon", True, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD, ids=str)
def test_check_refuses(name, value, error):
    hp = {**nadam.HYPERPARAMETERS, name: value}
    shown = repr(value) if isinstance(value, str) else str(value)
    pattern = rf"^Invalid {name} \(param group 1\): {re.escape(shown)} \(expected .+\)$"
    with pytest.raises(error, match=pattern):
        nadam.check(hp, " (param group 1)")


def test_check_accepts_edges_and_callables():
    nadam.check({"beta_1": 0.0, "beta_2": 0, "epsilon": 0.0})
    nadam.check({**nadam.HYPERPARAMETERS, "beta_2": lambda: 0.99})
