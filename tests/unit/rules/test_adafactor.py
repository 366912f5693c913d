"""Adafactor (``shardadam.rules.adafactor``) against Keras 3, one tensor at a time."""

import pytest

from shardadam.rules import adafactor

from .keras_driver import assert_matches_keras

LR = 0.01


@pytest.mark.parametrize(
    "shape", [(), (1,), (13,), (7, 5), (5, 7), (1, 9), (9, 1), (3, 4, 5), (2, 3, 1, 4)], ids=str
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_defaults(shape, compiled):
    assert_matches_keras(adafactor, {}, LR, shape=shape, compiled=compiled)


@pytest.mark.parametrize("hp", [
    {"beta_2_decay": -0.5},
    {"beta_2_decay": 0.0},
    {"epsilon_1": 1e-3},
    {"epsilon_2": 0.0},
    {"epsilon_2": 0.5},
    {"clip_threshold": 0.05},
    {"clip_threshold": 100.0},
    {"relative_step": False},
], ids=str)  # fmt: skip
def test_each_argument(hp):
    assert_matches_keras(adafactor, hp, LR, shape=(6, 5), seed=1)


def test_large_learning_rate_takes_one_over_sqrt_t():
    """rho_t = min(lr, 1/sqrt(t)): with lr 1 the step size is 1/sqrt(t) from step 2 on."""
    assert_matches_keras(adafactor, {"clip_threshold": 0.5}, 1.0, shape=(4, 3), seed=3)


@pytest.mark.parametrize("name, value, allowed", [
    ("beta_2_decay", 0.1, "beta_2_decay <= 0.0"),
    ("epsilon_1", 0.0, "epsilon_1 > 0.0"),
    ("epsilon_2", -1e-3, "epsilon_2 >= 0.0"),
    ("clip_threshold", 0.0, "clip_threshold > 0.0"),
    ("relative_step", 1, "True or False"),
])  # fmt: skip
def test_bad_arguments_name_themselves(name, value, allowed):
    with pytest.raises((ValueError, TypeError), match=allowed):
        adafactor.check({**adafactor.HYPERPARAMETERS, name: value}, "")
