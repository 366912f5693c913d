"""shardadam.rules.sgd against Keras 3's SGD (torch backend), step by step."""

from __future__ import annotations

import re

import pytest

from shardadam.rules import sgd
from tests.unit.rules.keras_driver import assert_matches_keras

LR = sgd.LEARNING_RATE  # 0.01 against gradients up to ~10: every step moves visibly

ALONE = [
    {"momentum": 0.9},
    {"momentum": 1.0},  # Keras's upper edge: the velocity never decays
    {"nesterov": True},  # without momentum Keras ignores it
]
COMBINED = {"momentum": 0.8, "nesterov": True}
STATIC_VARIANTS = [{}, {"momentum": 0.9}, COMBINED]  # one compile each


@pytest.mark.parametrize("hp", STATIC_VARIANTS, ids=str)
@pytest.mark.parametrize("compiled", [False, True])
def test_each_structure(hp, compiled):
    assert_matches_keras(sgd, hp, LR, compiled=compiled)


@pytest.mark.parametrize("hp", ALONE, ids=str)
def test_each_argument_alone(hp):
    assert_matches_keras(sgd, hp, LR, seed=1)


@pytest.mark.parametrize("shape", [(), (1,), (13,)], ids=str)
@pytest.mark.parametrize("hp", [{}, COMBINED], ids=str)
def test_shapes(shape, hp):
    assert_matches_keras(sgd, hp, 0.05, shape=shape, seed=2)


def keras_slots(**hp) -> dict[str, float]:
    """Keras's per-variable state for ``hp``: {name without the variable's prefix: value}."""
    import keras

    optimizer = keras.optimizers.SGD(**hp)
    optimizer.build([keras.Variable([1.0, 2.0], name="w")])
    return {
        v.name.removeprefix("w_"): float(keras.ops.convert_to_numpy(v)[0])
        for v in optimizer.variables
        if v.name.startswith("w_")
    }


@pytest.mark.parametrize(
    "hp, names", [({}, []), ({"momentum": 0.5}, ["momentum"]), (COMBINED, ["momentum"])], ids=str
)
def test_slots_are_keras_variables(hp, names):
    full = {**sgd.HYPERPARAMETERS, **hp}
    assert sgd.slots(full) == keras_slots(**hp) == dict.fromkeys(names, 0.0)


def test_static_ignores_nesterov_without_momentum():
    assert sgd.static({"momentum": 0.0, "nesterov": True}) == (False, False)
    assert sgd.static({"momentum": 0.5, "nesterov": True}) == (True, True)


BAD = [
    ("momentum", -0.1, ValueError),  # Keras refuses it too
    ("momentum", 1.5, ValueError),  # Keras refuses it too
    ("momentum", 0, TypeError),  # Keras refuses an int too
    ("momentum", float("nan"), ValueError),
    ("momentum", float("inf"), ValueError),
    ("momentum", True, TypeError),
    ("momentum", "0.9", TypeError),
    ("nesterov", 1, TypeError),
    ("nesterov", "yes", TypeError),
    ("nesterov", None, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD, ids=str)
def test_check_refuses(name, value, error):
    hp = {**sgd.HYPERPARAMETERS, name: value}
    shown = str(value) if error is ValueError else repr(value)
    pattern = rf"^Invalid {name} \(param group 1\): {re.escape(shown)} \(expected .+\)$"
    with pytest.raises(error, match=pattern):
        sgd.check(hp, " (param group 1)")


@pytest.mark.parametrize("momentum", [-0.1, 1.5, 0])
def test_keras_refuses_the_same_momentum(momentum):
    import keras

    with pytest.raises(ValueError, match="momentum"):
        keras.optimizers.SGD(momentum=momentum)


def test_check_accepts_edges():
    sgd.check({"momentum": 0.0, "nesterov": True})
    sgd.check({"momentum": 1.0, "nesterov": False})
