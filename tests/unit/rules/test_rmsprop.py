"""shardadam.rules.rmsprop against Keras 3's RMSprop (torch backend), step by step."""

from __future__ import annotations

import re

import pytest

from shardadam.rules import rmsprop
from tests.unit.rules.keras_driver import assert_matches_keras

LR = 0.01  # steps of about lr per element: Keras's 0.001 is visible, 0.01 more

ALONE = [
    {"rho": 0.5},
    {"rho": 0.0},  # v is this step's g^2 alone
    {"momentum": 0.9},
    {"epsilon": 1e-3},
    {"centered": True},
]
COMBINED = {"rho": 0.8, "momentum": 0.5, "epsilon": 1e-5, "centered": True}
STATIC_VARIANTS = [{}, {"momentum": 0.9}, {"centered": True}, COMBINED]  # one compile each


@pytest.mark.parametrize("hp", STATIC_VARIANTS, ids=str)
@pytest.mark.parametrize("compiled", [False, True])
def test_each_structure(hp, compiled):
    assert_matches_keras(rmsprop, hp, LR, compiled=compiled)


def test_defaults_at_keras_learning_rate():
    assert_matches_keras(rmsprop, {}, rmsprop.LEARNING_RATE, seed=3)


@pytest.mark.parametrize("hp", ALONE, ids=str)
def test_each_argument_alone(hp):
    assert_matches_keras(rmsprop, hp, LR, seed=1)


@pytest.mark.parametrize("shape", [(), (1,), (13,)], ids=str)
@pytest.mark.parametrize("hp", [{}, COMBINED], ids=str)
def test_shapes(shape, hp):
    assert_matches_keras(rmsprop, hp, LR, shape=shape, seed=2)


def keras_slots(**hp) -> dict[str, float]:
    """Keras's per-variable state for ``hp``: {name without the variable's prefix: value}."""
    import keras

    optimizer = keras.optimizers.RMSprop(**hp)
    optimizer.build([keras.Variable([1.0, 2.0], name="w")])
    return {
        v.name.removeprefix("w_"): float(keras.ops.convert_to_numpy(v)[0])
        for v in optimizer.variables
        if v.name.startswith("w_")
    }


@pytest.mark.parametrize(
    "hp, names",
    [
        ({}, ["velocity"]),
        ({"momentum": 0.5}, ["velocity", "momentum"]),
        ({"centered": True}, ["velocity", "average_gradient"]),
        (COMBINED, ["velocity", "momentum", "average_gradient"]),
    ],
    ids=str,
)
def test_slots_are_keras_variables(hp, names):
    full = {**rmsprop.HYPERPARAMETERS, **hp}
    slots = rmsprop.slots(full)
    assert slots == keras_slots(**hp) == dict.fromkeys(names, 0.0)
    assert list(slots) == names  # Keras's creation order: the order of update's new slots


BAD = [
    ("rho", -0.1, ValueError),
    ("rho", 1.5, ValueError),
    ("rho", float("nan"), ValueError),
    ("rho", True, TypeError),
    ("rho", "0.9", TypeError),
    ("momentum", -0.5, ValueError),
    ("momentum", 1.5, ValueError),
    ("momentum", float("inf"), ValueError),
    ("momentum", False, TypeError),
    ("epsilon", 0.0, ValueError),
    ("epsilon", -1e-7, ValueError),
    ("epsilon", float("inf"), ValueError),
    ("epsilon", None, TypeError),
    ("centered", 1, TypeError),
    ("centered", "False", TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD, ids=str)
def test_check_refuses(name, value, error):
    hp = {**rmsprop.HYPERPARAMETERS, name: value}
    shown = str(value) if error is ValueError else repr(value)
    pattern = rf"^Invalid {name} \(param group 1\): {re.escape(shown)} \(expected .+\)$"
    with pytest.raises(error, match=pattern):
        rmsprop.check(hp, " (param group 1)")


def test_check_accepts_edges():
    rmsprop.check({"rho": 0, "momentum": 1, "epsilon": 1e-30, "centered": True})
    rmsprop.check({"rho": 1.0, "momentum": 0.0, "epsilon": 1.0, "centered": False})
