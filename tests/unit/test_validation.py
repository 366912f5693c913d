"""Every argument is validated with an error that names it and its allowed values."""

from __future__ import annotations

import math

import pytest
import torch

from shardadam import ShardedAdam, schedules


def params(n: int = 2):
    return [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"learning_rate": -0.1},
            ValueError,
            r"Invalid learning_rate: -0.1 \(expected learning_rate >= 0",
        ),
        ({"learning_rate": math.nan}, ValueError, r"Invalid learning_rate: nan"),
        ({"learning_rate": "0.1"}, TypeError, r"Invalid learning_rate: '0.1' \(expected a float"),
        (
            {"learning_rate": torch.ones(2)},
            ValueError,
            r"1-element floating tensor \(0-d or 1-d\), got shape \(2,\)",
        ),
        ({"learning_rate": torch.tensor(1)}, ValueError, r"1-element floating tensor"),
        ({"beta_1": 1.0}, ValueError, r"Invalid beta_1: 1.0 \(expected 0 <= beta_1 < 1\)"),
        ({"beta_1": -0.1}, ValueError, r"Invalid beta_1: -0.1"),
        ({"beta_2": 1.5}, ValueError, r"Invalid beta_2: 1.5 \(expected 0 <= beta_2 < 1\)"),
        ({"beta_2": "x"}, TypeError, r"Invalid beta_2: 'x'"),
        ({"epsilon": -1e-7}, ValueError, r"Invalid epsilon: -1e-07 \(expected epsilon >= 0"),
        ({"amsgrad": "yes"}, TypeError, r"Invalid amsgrad: 'yes' \(expected True or False\)"),
        (
            {"weight_decay": -0.1},
            ValueError,
            r"Invalid weight_decay: -0.1 \(expected weight_decay >= 0",
        ),
        ({"clipnorm": 0.0}, ValueError, r"Invalid clipnorm: 0.0 \(expected clipnorm > 0"),
        ({"clipvalue": -1.0}, ValueError, r"Invalid clipvalue: -1.0 \(expected clipvalue > 0"),
        (
            {"global_clipnorm": 0},
            ValueError,
            r"Invalid global_clipnorm: 0 \(expected global_clipnorm > 0",
        ),
        (
            {"clipnorm": 1.0, "clipvalue": 1.0},
            ValueError,
            r"Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set",
        ),
        (
            {"clipnorm": 1.0, "global_clipnorm": 1.0},
            ValueError,
            r"Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set",
        ),
        ({"use_ema": 1}, TypeError, r"Invalid use_ema: 1 \(expected True or False\)"),
        (
            {"ema_momentum": 1.5},
            ValueError,
            r"Invalid ema_momentum: 1.5 \(expected ema_momentum >= 0.0 and ema_momentum <= 1.0\)",
        ),
        (
            {"ema_overwrite_frequency": 0},
            ValueError,
            r"Invalid ema_overwrite_frequency: 0 \(expected an integer >= 1 or None\)",
        ),
        ({"ema_overwrite_frequency": 2.5}, ValueError, r"Invalid ema_overwrite_frequency: 2.5"),
        (
            {"loss_scale_factor": 0.0},
            ValueError,
            r"Invalid loss_scale_factor: 0.0 \(expected loss_scale_factor > 0",
        ),
        (
            {"gradient_accumulation_steps": 1},
            ValueError,
            r"Invalid gradient_accumulation_steps: 1 \(expected an integer >= 2 or None\)",
        ),
        ({"jit_compile": "no"}, TypeError, r"Invalid jit_compile: 'no' \(expected True or False\)"),
        ({"name": ""}, ValueError, r"Invalid name: ''"),
        ({"name": "a/b"}, ValueError, r"without '/'"),
        ({"stage": 3}, ValueError, r"Invalid stage: 3 \(expected one of \(1, 2\)\)"),
        (
            {"bucket_cap_mb": 0},
            ValueError,
            r"Invalid bucket_cap_mb: 0 \(expected bucket_cap_mb > 0",
        ),
        (
            {"comm": "mpi"},
            ValueError,
            r"Invalid comm: 'mpi' \(expected one of "
            r"\('auto', 'native', 'ring', 'pairwise', 'all_reduce'\)\)",
        ),
        ({"momentum": 0.9}, ValueError, r"Argument\(s\) not recognized: \['momentum'\]"),
        (
            {"overlap_param_gather": 1},
            TypeError,
            r"Invalid overlap_param_gather: 1 \(expected True or False\)",
        ),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        ShardedAdam(params(), **{"jit_compile": False, **kwargs})


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match=r"`decay_steps` must be > 0. Received: decay_steps=0"):
        schedules.ExponentialDecay(0.1, decay_steps=0, decay_rate=0.5)
    with pytest.raises(ValueError, match=r"`first_decay_steps` must be > 0"):
        schedules.CosineDecayRestarts(0.1, first_decay_steps=-1)
    with pytest.raises(ValueError, match="length of boundaries should be 1 less"):
        schedules.PiecewiseConstantDecay([1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="strictly increasing"):
        schedules.PiecewiseConstantDecay([2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="Invalid warmup_steps"):
        schedules.CosineDecay(0.0, 10, warmup_target=0.1, warmup_steps=-2)


def test_bad_parameters_are_rejected():
    with pytest.raises(TypeError, match=r"dtype torch.int64; expected a floating dtype"):
        ShardedAdam([torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match="is sparse"):
        ShardedAdam(
            [torch.sparse_coo_tensor([[0]], [1.0], (3,), check_invariants=True).requires_grad_()]
        )
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(
        ValueError,
        match=r"parameter 'v' \(param group 0\) is given twice: it is the same tensor as "
        r"parameter 'w' \(param group 0\)",
    ):
        ShardedAdam([("w", p), ("v", p)])
    with pytest.raises(ValueError, match=r"is given twice"):
        ShardedAdam([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match=r"several devices \['cpu', 'meta'\]"):
        ShardedAdam([p, torch.nn.Parameter(torch.empty(3, device="meta"))])
    with pytest.raises(ValueError, match="empty parameter list"):
        ShardedAdam([])
    with pytest.raises(TypeError, match="is a str; expected a tensor"):
        ShardedAdam(["w"])


def test_bad_param_group_overrides_name_the_group():
    a, b = params()
    with pytest.raises(ValueError, match=r"Invalid learning_rate \(param group 1\): -1"):
        ShardedAdam([{"params": [a]}, {"params": [b], "learning_rate": -1.0}])
    with pytest.raises(ValueError, match=r"'global_clipnorm' cannot be set per param group"):
        ShardedAdam([{"params": [a], "global_clipnorm": 1.0}])
    with pytest.raises(ValueError, match=r"both 'beta_1' and 'betas' are given"):
        ShardedAdam([{"params": [a], "beta_1": 0.8, "betas": (0.8, 0.9)}])
    with pytest.raises(ValueError, match=r"Only one of `clipnorm`"):
        ShardedAdam([{"params": [a], "clipvalue": 1.0}], global_clipnorm=1.0)


def test_bad_hyperparameter_at_step_time_loses_nothing():
    ps = params(3)
    beta = {"value": 0.9}
    opt = ShardedAdam(
        [{"params": ps[:2]}, {"params": ps[2:], "beta_1": lambda: beta["value"]}],
        learning_rate=0.1,
        gradient_accumulation_steps=2,
        jit_compile=False,
    )
    for p in ps:
        p.grad = torch.ones(3)
    opt.step()  # accumulates only
    before = [p.detach().clone() for p in ps]
    state_before = {k: v.clone() for k, v in opt.state[ps[0]].items()}
    beta["value"] = 1.0
    with pytest.raises(ValueError, match=r"Invalid beta_1: 1.0 \(expected 0 <= beta_1 < 1\)"):
        opt.step()
    for p, b in zip(ps, before):
        assert torch.equal(p, b)
    for k, v in opt.state[ps[0]].items():
        assert torch.equal(v, state_before[k]), k
    assert opt.iterations == 0
    beta["value"] = 0.9
    opt.step()
    assert opt.iterations == 1
    assert not torch.equal(ps[0], before[0])


def test_negative_learning_rate_written_into_a_group_is_rejected_at_step():
    p = torch.nn.Parameter(torch.randn(3))
    opt = ShardedAdam([p], jit_compile=False)
    opt.param_groups[0]["lr"] = -1.0
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="Invalid learning_rate"):
        opt.step()


def test_schedule_learning_rate_is_not_settable():
    p = torch.nn.Parameter(torch.randn(3))
    opt = ShardedAdam(
        [p], learning_rate=schedules.ExponentialDecay(0.1, 10, 0.5), jit_compile=False
    )
    with pytest.raises(TypeError, match="not settable"):
        opt.learning_rate = 0.1
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["lr"] = 0.5  # e.g. a torch LR scheduler writing the group
    with pytest.raises(TypeError, match="not settable"):
        opt.step()


def test_exclude_from_weight_decay_errors():
    opt = ShardedAdam(params(), jit_compile=False)
    with pytest.raises(
        ValueError,
        match=r"needs parameter names: create the optimizer from model.named_parameters\(\)",
    ):
        opt.exclude_from_weight_decay(var_names=["bias"])
    named = ShardedAdam([("w", torch.nn.Parameter(torch.randn(2)))], jit_compile=False)
    with pytest.raises(ValueError, match=r"Invalid var_names: \['\('\]"):
        named.exclude_from_weight_decay(var_names=["("])
    with pytest.raises(ValueError, match="Invalid var_list"):
        named.exclude_from_weight_decay(var_list=[torch.randn(2)])


def test_ema_read_out_without_ema_raises():
    p = torch.nn.Parameter(torch.randn(3))
    opt = ShardedAdam([p], jit_compile=False)
    with pytest.raises(RuntimeError, match="needs use_ema=True"):
        opt.moving_average(p)
    with pytest.raises(RuntimeError, match="needs use_ema=True"):
        with opt.swap_moving_averages():
            pass
