"""Every member of the family through the whole optimizer (the engine and its rule) against
Keras 3's optimizer of the same name, in one process: its defaults, its own arguments, and the
base optimizer's (weight decay with exclusions, each clip mode, the EMA with overwrite,
accumulation, a schedule), over 50 steps of varied gradients on SHAPES (0-d, size 1, odd sizes,
a transposed tensor).
"""

from __future__ import annotations

import copy

import pytest
import torch

from shardadam import optimizers, schedules
from tests.reference import (
    LR,
    SHAPES,
    assert_all_close,
    make_case,
    make_schedule,
    run_keras,
    run_ours,
)

MEMBERS = {name: cls for name, cls in optimizers.FAMILY.items() if name != "Adam"}
"""Keras name -> class (Adam has its own, fuller tests in test_keras_parity.py)."""

# Per member, a setting of its own arguments that moves every slot it has.
OWN_ARGUMENTS = {
    "AdamW": {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5, "amsgrad": True},
    "SGD": {"momentum": 0.9, "nesterov": True},
    "RMSprop": {"rho": 0.8, "momentum": 0.5, "epsilon": 1e-5, "centered": True},
    "Adagrad": {"initial_accumulator_value": 0.3, "epsilon": 1e-5},
    "Adadelta": {"rho": 0.8, "epsilon": 1e-5},
    "Adamax": {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5},
    "Nadam": {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5},
    "Ftrl": {
        "learning_rate_power": -0.3,
        "initial_accumulator_value": 0.2,
        "l1_regularization_strength": 0.01,
        "l2_regularization_strength": 0.02,
        "l2_shrinkage_regularization_strength": 0.03,
        "beta": 0.1,
    },
    "Lion": {"beta_1": 0.8, "beta_2": 0.95},
    "Lamb": {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5},
}

BASE_CASES = {
    "defaults": {},
    "own arguments": "own",
    "weight decay, excluded by name": {"weight_decay": 0.1},
    "clipnorm": {"clipnorm": 0.5},
    "clipvalue": {"clipvalue": 0.05},
    "global_clipnorm and EMA overwrite": {
        "global_clipnorm": 0.7,
        "use_ema": True,
        "ema_momentum": 0.9,
        "ema_overwrite_frequency": 7,
    },
    "accumulation": {"gradient_accumulation_steps": 3},
    "schedule": {"learning_rate": "exponential_staircase"},
    "combination": {"weight_decay": 0.05, "clipnorm": 1.0, "use_ema": True, "own": True},
}


def _arguments(member: str, case: dict | str) -> dict:
    if case == "own":
        return dict(OWN_ARGUMENTS.get(member, {}))
    arguments = {k: v for k, v in case.items() if k != "own"}
    if case.get("own"):
        arguments.update(OWN_ARGUMENTS.get(member, {}))
    return arguments


@pytest.mark.parametrize("member", sorted(MEMBERS))
@pytest.mark.parametrize("case_name", list(BASE_CASES))
def test_member_matches_keras(member, case_name):
    arguments = {"learning_rate": LR, **_arguments(member, BASE_CASES[case_name])}
    case = make_case(SHAPES, steps=50, seed=len(case_name), transposed={4})
    exclude = {"var_names": ["bias"]} if "weight_decay" in arguments else None
    keras_kwargs = dict(arguments)
    ours_kwargs = dict(arguments)
    if isinstance(arguments["learning_rate"], str):
        import keras

        schedule = arguments["learning_rate"]
        keras_kwargs["learning_rate"] = make_schedule(keras.optimizers.schedules, schedule)
        ours_kwargs["learning_rate"] = make_schedule(schedules, schedule)
    # The compiled kernel for the defaults (one compilation per member); eager elsewhere.
    ours_kwargs["jit_compile"] = case_name == "defaults"
    expected, expected_ema = run_keras(case, keras_kwargs, exclude=exclude, keras_name=member)
    ours, ours_ema, _ = run_ours(
        case, ours_kwargs, exclude=exclude, optimizer_class=MEMBERS[member]
    )
    assert_all_close(ours, expected, case.names)
    if expected_ema is not None:
        assert_all_close(ours_ema, expected_ema, case.names)


def test_adamw_refuses_no_weight_decay():
    import torch

    with pytest.raises(ValueError, match="weight_decay"):
        optimizers.ShardedAdamW([torch.nn.Parameter(torch.zeros(2))], weight_decay=None)


def test_ftrl_refuses_a_learning_rate_of_zero_before_changing_anything():
    import torch

    param = torch.nn.Parameter(torch.ones(3))
    opt = optimizers.ShardedFtrl(
        [param], learning_rate=schedules.CosineDecay(0.0, 10, warmup_target=0.1, warmup_steps=5)
    )
    param.grad = torch.full((3,), 0.5)
    with pytest.raises(ValueError, match=r"Invalid learning_rate \(param group 0\): 0.0"):
        opt.step()
    assert torch.equal(param.detach(), torch.ones(3))
    assert opt.iterations == 0


@pytest.mark.parametrize("member", sorted(optimizers.FAMILY))
def test_member_with_bf16_parameters_follows_its_fp32_master_run(member):
    """Fine-tuning a bf16 model: each member updates fp32 master copies that follow the fp32
    run of the same gradients (bf16-representable, so both runs see the same numbers), and the
    bf16 parameters are those masters rounded."""
    cls = optimizers.FAMILY[member]
    arguments = {"learning_rate": LR, "weight_decay": 0.05, **OWN_ARGUMENTS.get(member, {})}
    case = make_case(SHAPES, steps=20, seed=7, transposed={4})
    case.init = [x.to(torch.bfloat16).float() for x in case.init]
    case.grads = [[None if g is None else g.to(torch.bfloat16).float() for g in row]
                  for row in case.grads]  # fmt: skip
    fp32, _, _ = run_ours(case, {**arguments, "jit_compile": False}, optimizer_class=cls)
    bf16_params = [torch.nn.Parameter(x.to(torch.bfloat16)) for x in case.init]
    bf16_case = copy.copy(case)
    bf16_case.grads = [[None if g is None else g.to(torch.bfloat16) for g in row]
                       for row in case.grads]  # fmt: skip
    ours, _, opt = run_ours(
        bf16_case, {**arguments, "jit_compile": False}, params=bf16_params, optimizer_class=cls
    )
    masters = [opt.state[p][f"{member}/master"] for p in bf16_params]
    assert_all_close(masters, fp32, case.names)
    for name, p, master in zip(case.names, ours, masters):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, master.to(torch.bfloat16)), name
