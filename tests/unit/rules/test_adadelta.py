"""shardadam.rules.adadelta against Keras 3's Adadelta (torch backend), step by step."""

from __future__ import annotations

import re

import pytest
import torch

from shardadam.rules import adadelta
from tests.unit.rules.keras_driver import assert_matches_keras, rule_weights, varied_grads

# Keras's default lr 0.001 moves the weights by ~1e-6 over 50 steps, within the tolerance: a
# wrong rule would pass. The paper's lr 1 moves them by about 1e-2 (see test_steps_are_visible).
LR = 1.0

ALONE = [
    {"rho": 0.5},
    {"rho": 0.0},
    {"rho": 1.0},  # the accumulators stay 0: d = g, plain SGD
    {"epsilon": 1e-3},
]
COMBINED = {"rho": 0.8, "epsilon": 1e-5}


@pytest.mark.parametrize("compiled", [False, True])
def test_defaults(compiled):
    assert_matches_keras(adadelta, {}, LR, compiled=compiled)


def test_defaults_at_keras_learning_rate():
    assert_matches_keras(adadelta, {}, adadelta.LEARNING_RATE, seed=3)


@pytest.mark.parametrize("hp", ALONE, ids=str)
def test_each_argument_alone(hp):
    assert_matches_keras(adadelta, hp, 0.01 if hp.get("rho") == 1.0 else LR, seed=1)


@pytest.mark.parametrize("compiled", [False, True])
def test_combination(compiled):
    assert_matches_keras(adadelta, COMBINED, LR, compiled=compiled, seed=4)


@pytest.mark.parametrize("shape", [(), (1,), (13,)], ids=str)
def test_shapes(shape):
    assert_matches_keras(adadelta, COMBINED, LR, shape=shape, seed=2)


def test_steps_are_visible():
    """At LR the weights move by far more than the comparison's tolerance."""
    init = torch.zeros(35)
    final = rule_weights(adadelta, {}, LR, init, varied_grads((35,)), compiled=False)[-1]
    assert final.abs().max() > 1e-3


def test_slots_are_keras_variables():
    import keras

    optimizer = keras.optimizers.Adadelta()
    optimizer.build([keras.Variable([1.0, 2.0], name="w")])
    per_element = {
        v.name.removeprefix("w_"): float(keras.ops.convert_to_numpy(v)[0])
        for v in optimizer.variables
        if v.name.startswith("w_")
    }
    expected = {"accumulated_grad": 0.0, "accumulated_delta_var": 0.0}
    slots = adadelta.slots(adadelta.HYPERPARAMETERS)
    assert slots == per_element == expected
    assert list(slots) == list(expected)  # Keras's creation order: the order of update's
    assert adadelta.static(adadelta.HYPERPARAMETERS) == ()


BAD = [
    ("rho", -0.1, ValueError),
    ("rho", 1.5, ValueError),
    ("rho", float("nan"), ValueError),
    ("rho", True, TypeError),
    ("rho", "0.95", TypeError),
    ("epsilon", 0.0, ValueError),  # the weights would never move
    ("epsilon", -1e-7, ValueError),
    ("epsilon", float("inf"), ValueError),
    ("epsilon", None, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD, ids=str)
def test_check_refuses(name, value, error):
    hp = {**adadelta.HYPERPARAMETERS, name: value}
    shown = str(value) if error is ValueError else repr(value)
    pattern = rf"^Invalid {name} \(param group 1\): {re.escape(shown)} \(expected .+\)$"
    with pytest.raises(error, match=pattern):
        adadelta.check(hp, " (param group 1)")


def test_check_accepts_edges():
    adadelta.check({"rho": 0, "epsilon": 1e-30})
    adadelta.check({"rho": 1, "epsilon": 1.0})
