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
from shardadam.rule_groups import rule_group_keys
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
    "Adafactor": {
        "beta_2_decay": -0.6,
        "epsilon_1": 1e-20,
        "epsilon_2": 1e-2,
        "clip_threshold": 0.1,
    },
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


@pytest.mark.parametrize("names", ["keras", "torch"])
@pytest.mark.parametrize("member", sorted(optimizers.FAMILY))
def test_member_param_group_overrides_equal_a_separate_keras_optimizer(member, names):
    """A second param group with its own learning rate and own arguments, given by Keras's
    names or torch's keys (``betas``, ``eps``, ``alpha``...), trains as a Keras optimizer of
    those arguments would (Keras has one set per optimizer: two Keras optimizers)."""
    cls = optimizers.FAMILY[member]
    case = make_case([(4, 3), (5,), (2, 3)], steps=50, seed=3)
    params = [torch.nn.Parameter(x.clone()) for x in case.init]
    own = dict(OWN_ARGUMENTS.get(member, {}))
    base = {"learning_rate": LR, "weight_decay": 0.1}
    probe = cls([torch.nn.Parameter(torch.zeros(1))], jit_compile=False)
    overrides = dict(own) if names == "keras" else _torch_keys(probe._rule, own)
    groups = [{"params": params[:2]}, {"params": params[2:], "learning_rate": 0.01, **overrides}]
    opt = cls(groups, **base, jit_compile=False)
    for grads in case.grads:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    first = make_case([(4, 3), (5,)], steps=0)
    first.init, first.grads = case.init[:2], [g[:2] for g in case.grads]
    second = make_case([(2, 3)], steps=0)
    second.init, second.grads = case.init[2:], [g[2:] for g in case.grads]
    k1, _ = run_keras(first, base, keras_name=member)
    k2, _ = run_keras(second, {**base, "learning_rate": 0.01, **own}, keras_name=member)
    assert_all_close([p.detach() for p in params], k1 + k2, ["a", "b", "c"])


def _torch_keys(rule, own: dict) -> dict:
    """``own`` (Keras names) under the rule's param-group keys, tuples completed with defaults."""
    keys = rule_group_keys(rule)
    group: dict = {}
    for name, value in own.items():
        key, index = keys[name]
        if index is None:
            group[key] = value
        else:
            width = 1 + max(i for k, i in keys.values() if k == key and i is not None)
            default = [rule.HYPERPARAMETERS[n] for n, (k, _) in keys.items() if k == key]
            current = list(group.get(key, default[:width]))
            current[index] = value
            group[key] = tuple(current)
    return group


def test_nadam_keeps_one_u_product_per_param_group_through_a_state_dict():
    """Nadam's u_product depends on beta_1, so each group keeps its own: a run resumed from a
    state_dict continues as the uninterrupted one, and an older state_dict holding a single
    value gives it to every group."""
    case = make_case([(4, 3), (5,)], steps=20, seed=4)

    def build(params):
        groups = [{"params": params[:1]}, {"params": params[1:], "beta_1": 0.7}]
        return optimizers.ShardedNadam(groups, learning_rate=LR, jit_compile=False)

    def train(opt, params, rows):
        for grads in rows:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()

    params = [torch.nn.Parameter(x.clone()) for x in case.init]
    opt = build(params)
    train(opt, params, case.grads)
    resumed_params = [torch.nn.Parameter(x.clone()) for x in case.init]
    first = build(resumed_params)
    train(first, resumed_params, case.grads[:8])
    saved = first.state_dict()
    assert len(saved["shardadam"]["carry"]["u_product"]) == 2
    second = build(resumed_params)
    second.load_state_dict(saved)
    train(second, resumed_params, case.grads[8:])
    assert_all_close([p.detach() for p in resumed_params], [p.detach() for p in params], "ab")

    older = copy.deepcopy(saved)
    older["shardadam"]["carry"] = {"u_product": saved["shardadam"]["carry"]["u_product"][0]}
    third = build([torch.nn.Parameter(x.clone()) for x in case.init])
    third.load_state_dict(older)
    assert (
        third.state_dict()["shardadam"]["carry"]["u_product"]
        == [saved["shardadam"]["carry"]["u_product"][0]] * 2
    )


@pytest.mark.parametrize("member", sorted(optimizers.FAMILY))
def test_member_says_which_rule_it_runs(member):
    cls = optimizers.FAMILY[member]
    opt = cls([torch.nn.Parameter(torch.zeros(2))], jit_compile=False)
    assert cls.RULE is opt._rule
    assert cls.RULE.NAME == ("Adam" if member == "AdamW" else member)
    assert opt.state_dict()["shardadam"]["name"] == member
