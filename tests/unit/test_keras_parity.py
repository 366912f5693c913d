"""ShardedAdam against Keras 3's Adam, parameter by parameter, over 50+ steps."""

from __future__ import annotations

import pytest
import torch

from shardadam import schedules
from tests.reference import (
    LR,
    SCHEDULES,
    SHAPES,
    assert_all_close,
    make_case,
    resolve_schedules,
    run_keras,
    run_ours,
)

CASE = make_case(SHAPES, steps=50, transposed={4})

SINGLE_ARGUMENTS = {
    "defaults": {},
    "lr": {"learning_rate": LR},
    "amsgrad": {"learning_rate": LR, "amsgrad": True},
    "weight_decay": {"learning_rate": LR, "weight_decay": 0.1},
    "clipnorm": {"learning_rate": LR, "clipnorm": 1.0},
    "clipvalue": {"learning_rate": LR, "clipvalue": 0.3},
    "global_clipnorm": {"learning_rate": LR, "global_clipnorm": 2.0},
    "epsilon": {"learning_rate": LR, "epsilon": 1e-3},
    "betas": {"learning_rate": LR, "beta_1": 0.5, "beta_2": 0.9},
    "use_ema": {"learning_rate": LR, "use_ema": True, "ema_momentum": 0.9},
    "ema_overwrite": {
        "learning_rate": LR,
        "use_ema": True,
        "ema_momentum": 0.8,
        "ema_overwrite_frequency": 7,
    },
    "loss_scale_factor": {"learning_rate": LR, "loss_scale_factor": 128.0},
    "gradient_accumulation": {"learning_rate": LR, "gradient_accumulation_steps": 3},
}

COMBINATIONS = {
    "amsgrad+decay+clipnorm+ema_overwrite": {
        "learning_rate": LR,
        "amsgrad": True,
        "weight_decay": 0.05,
        "clipnorm": 0.7,
        "use_ema": True,
        "ema_overwrite_frequency": 4,
    },
    "accumulation+ema+global_clip+loss_scale": {
        "learning_rate": LR,
        "gradient_accumulation_steps": 4,
        "use_ema": True,
        "ema_momentum": 0.9,
        "ema_overwrite_frequency": 2,
        "global_clipnorm": 1.5,
        "loss_scale_factor": 64.0,
    },
    "schedule+decay+clipvalue+amsgrad": {
        "learning_rate": "cosine_warmup",
        "weight_decay": 0.2,
        "clipvalue": 0.5,
        "amsgrad": True,
    },
    "schedule+accumulation+decay": {
        "learning_rate": "exponential",
        "gradient_accumulation_steps": 2,
        "weight_decay": 0.1,
    },
}


def _compare(kwargs: dict, jit_compile: bool = False, case=CASE, **options) -> None:
    import keras

    theirs, their_avg = run_keras(
        case, resolve_schedules(kwargs, keras.optimizers.schedules), **options
    )
    ours, our_avg, _ = run_ours(
        case, {**resolve_schedules(kwargs, schedules), "jit_compile": jit_compile}, **options
    )
    assert_all_close(ours, theirs, case.names)
    if their_avg is not None:
        assert_all_close(our_avg, their_avg, case.names)


@pytest.mark.parametrize("name", sorted(SINGLE_ARGUMENTS))
def test_each_argument_alone_matches_keras(name):
    _compare(SINGLE_ARGUMENTS[name])


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_combinations_match_keras(name):
    _compare(COMBINATIONS[name])


@pytest.mark.parametrize("kind", SCHEDULES)
def test_each_schedule_matches_keras(kind):
    _compare({"learning_rate": kind})


def test_weight_decay_exclusions_match_keras():
    exclude = {"var_names": ["bias$", "layer5"], "var_list": [0]}
    _compare({"learning_rate": LR, "weight_decay": 0.3}, exclude=exclude)


def test_ema_finalize_matches_keras():
    _compare({"learning_rate": LR, "use_ema": True, "ema_momentum": 0.95}, finalize=True)


def test_callable_learning_rate_is_called_every_step():
    counter = {"step": 0}

    def learning_rate():
        return LR / (1 + counter["step"])

    def advance(step, opt):
        counter["step"] = step

    _compare({"learning_rate": learning_rate}, before_step=advance)


def test_tensor_learning_rate_follows_in_place_changes():
    import keras

    values = [LR * (0.97**s) for s in range(len(CASE.grads))]
    theirs, _ = run_keras(
        CASE,
        {"learning_rate": LR},
        before_step=lambda s, opt: setattr(opt, "learning_rate", values[s]),
    )
    lr = torch.tensor(LR)
    ours, _, opt = run_ours(
        CASE,
        {"learning_rate": lr, "jit_compile": False},
        before_step=lambda s, o: lr.fill_(values[s]),
    )
    assert_all_close(ours, theirs, CASE.names)
    assert opt.param_groups[0]["lr"] is lr
    del keras


def test_callable_betas_are_read_every_step():
    beta_1s = [0.9 - 0.4 * (s % 3) / 3 for s in range(len(CASE.grads))]
    beta_2s = [0.999 - 0.05 * (s % 5) / 5 for s in range(len(CASE.grads))]
    current = {"step": 0}

    def set_keras_betas(step, opt):
        opt.beta_1, opt.beta_2 = beta_1s[step], beta_2s[step]

    theirs, _ = run_keras(CASE, {"learning_rate": LR}, before_step=set_keras_betas)
    ours, _, _ = run_ours(
        CASE,
        {
            "learning_rate": LR,
            "beta_1": lambda: beta_1s[current["step"]],
            "beta_2": lambda: beta_2s[current["step"]],
            "jit_compile": False,
        },
        before_step=lambda s, o: current.update(step=s),
    )
    assert_all_close(ours, theirs, CASE.names)


def test_parameters_without_gradients_match_keras():
    # Parameter 2 never has a gradient; others miss some steps (Keras skips them, EMA advances).
    missing = {s: {2} | ({0, 5} if s % 3 == 1 else set()) for s in range(50)}
    case = make_case(SHAPES, steps=50, seed=3, missing=missing)
    _compare(
        {"learning_rate": LR, "weight_decay": 0.1, "use_ema": True, "amsgrad": True}, case=case
    )
    _compare({"learning_rate": LR, "gradient_accumulation_steps": 2, "clipnorm": 1.0}, case=case)
    # A parameter with an accumulated gradient but none at the boundary step is skipped and
    # adds nothing to the global norm.
    _compare(
        {"learning_rate": LR, "gradient_accumulation_steps": 2, "global_clipnorm": 1.0}, case=case
    )


@pytest.mark.parametrize(
    "name",
    ["lr", "amsgrad+decay+clipnorm+ema_overwrite", "accumulation+ema+global_clip+loss_scale"],
)
def test_compiled_update_matches_keras(name):
    kwargs = SINGLE_ARGUMENTS.get(name) or COMBINATIONS[name]
    _compare(kwargs, jit_compile=True)


def test_compiled_update_with_missing_gradients_and_exclusions_matches_keras():
    missing = {s: {1, 3} for s in range(0, 50, 4)}
    case = make_case(SHAPES, steps=50, seed=5, missing=missing)
    _compare(
        {"learning_rate": LR, "weight_decay": 0.2},
        jit_compile=True,
        case=case,
        exclude={"var_names": ["kernel"]},
    )
