"""state_dict() / load_state_dict(): a resumed run continues bit-identically."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from shardadam import ShardedAdam, schedules
from tests.reference import make_case

SHAPES = [(6, 5), (7,), (), (3, 3)]


def build(params, beta_1, **overrides):
    """Two groups, bf16 and fp32 parameters, every stateful option switched on."""
    kwargs = dict(
        learning_rate=schedules.CosineDecay(0.05, decay_steps=40, alpha=0.1),
        beta_1=beta_1,
        amsgrad=True,
        weight_decay=0.1,
        clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=5,
        gradient_accumulation_steps=3,
        name="MyAdam",
        jit_compile=False,
    )
    kwargs.update(overrides)
    groups = [
        {"params": [("a.weight", params[0]), ("a.bias", params[1])]},
        {"params": [("b.scale", params[2]), ("b.weight", params[3])], "learning_rate": 0.01},
    ]
    return ShardedAdam(groups, **kwargs)


def make_params(case):
    dtypes = [torch.float32, torch.float32, torch.float32, torch.bfloat16]
    return [torch.nn.Parameter(x.to(d)) for x, d in zip(case.init, dtypes)]


def train(opt, params, rows):
    for row in rows:
        for p, g in zip(params, row):
            p.grad = g.to(p.dtype)
        opt.step()


def test_resumed_run_continues_bit_identically():
    case = make_case(SHAPES, steps=40, seed=21)
    beta_1 = lambda: 0.85  # noqa: E731  (callables are code: not saved, kept by the loader)

    params = make_params(case)
    opt = build(params, beta_1)
    opt.exclude_from_weight_decay(var_names=["bias$"])
    train(opt, params, case.grads)
    uninterrupted = [p.detach().clone() for p in params]
    final_state = copy.deepcopy(opt.state_dict())

    first = make_params(case)
    opt1 = build(first, beta_1)
    opt1.exclude_from_weight_decay(var_names=["bias$"])
    train(opt1, first, case.grads[:23])  # 23 micro-steps: in the middle of an accumulation
    blob = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=False)

    second = [torch.nn.Parameter(x.clone()) for x in saved["params"]]
    opt2 = build(second, beta_1)  # no exclusions here: they come from the state_dict
    opt2.load_state_dict(saved["opt"])
    assert opt2.iterations == opt1.iterations == 7
    train(opt2, second, case.grads[23:])

    for p, q in zip(second, uninterrupted):
        assert torch.equal(p.detach(), q)
    resumed_state = opt2.state_dict()
    for index, entries in final_state["state"].items():
        for key, value in entries.items():
            assert torch.equal(resumed_state["state"][index][key], value), (index, key)
    assert resumed_state["shardadam"] == final_state["shardadam"]


def test_accumulators_are_stored_only_within_a_cycle_and_only_where_accumulated():
    """At a cycle boundary no accumulator is stored; within one, only those of parameters
    that accumulated a gradient (not a full-size zero tensor for every parameter)."""
    case = make_case(SHAPES, steps=5, seed=3)
    params = make_params(case)
    opt = build(params, 0.9)
    train(opt, params, case.grads[:3])  # one whole cycle of 3 micro-steps
    assert not any("MyAdam/gradient_accumulator" in e for e in opt.state_dict()["state"].values())
    rows = [list(row) for row in case.grads[3:5]]
    rows[0][1] = rows[1][1] = None  # parameter 1 gets no gradient in this cycle
    for row in rows:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()
    state = opt.state_dict()["state"]
    key = "MyAdam/gradient_accumulator"
    assert key not in state[1]
    for i in (0, 2, 3):
        expected = sum(row[i].to(params[i].dtype) for row in rows)
        torch.testing.assert_close(state[i][key], expected.to(state[i][key].dtype))

    # The state_dict resumes: a fresh optimizer continues exactly as this one.
    fresh = make_params(case)
    for p, q in zip(fresh, params):
        p.data.copy_(q.detach())
    other = build(fresh, 0.9)
    other.load_state_dict(opt.state_dict())
    last = case.grads[5 % len(case.grads)]
    train(opt, params, [last])
    train(other, fresh, [last])
    for p, q in zip(params, fresh):
        assert torch.equal(p.detach(), q.detach())


def trained(steps: int):
    """(case, optimizer, its state_dict) after ``steps`` micro-steps."""
    case = make_case(SHAPES, steps=steps, seed=1)
    params = make_params(case)
    opt = build(params, 0.9)
    train(opt, params, case.grads)
    return case, opt, opt.state_dict()


def test_state_names_carry_the_optimizer_name():
    _, _, sd = trained(steps=4)  # within an accumulation cycle: accumulators are stored
    assert set(sd["state"][3]) == {
        "MyAdam/momentum",
        "MyAdam/velocity",
        "MyAdam/velocity_hat",
        "MyAdam/average",
        "MyAdam/master",
        "MyAdam/gradient_accumulator",
    }
    assert sd["state"][0]["MyAdam/momentum"].shape == (6, 5)
    assert sd["param_groups"][1]["lr"] == 0.01
    assert sd["param_groups"][0]["lr_schedule"] is None
    assert sd["shardadam"]["micro_steps"] == 4


def test_loading_restores_saved_hyperparameters():
    p = torch.nn.Parameter(torch.randn(3))
    opt = ShardedAdam([p], learning_rate=0.01, beta_2=0.99, jit_compile=False)
    sd = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(torch.randn(3))
    other = ShardedAdam([q], learning_rate=0.1, jit_compile=False)
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 0.01
    assert other.param_groups[0]["betas"] == (0.9, 0.99)


def test_mismatched_state_dicts_are_refused_clearly():
    case, opt, sd = trained(steps=2)

    with pytest.raises(ValueError, match="expects the state_dict\\(\\) of a ShardedAdam"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    fewer = [torch.nn.Parameter(torch.randn(2))]
    with pytest.raises(
        ValueError, match="the state_dict has 2 param groups but this optimizer has 1"
    ):
        ShardedAdam(fewer, jit_compile=False).load_state_dict(sd)
    with pytest.raises(
        ValueError, match="saved with use_ema=True but this optimizer has use_ema=False"
    ):
        build(make_params(case), 0.9, use_ema=False, ema_overwrite_frequency=None).load_state_dict(
            sd
        )
    other_shapes = make_case([(5, 6), (7,), (), (3, 3)], steps=0, seed=1)
    with pytest.raises(
        ValueError, match=r"'a.weight' has shape \(6, 5\)|parameter 'a.weight' has shape"
    ):
        build(make_params(other_shapes), 0.9).load_state_dict(sd)


def test_torch_adamw_state_imports_and_training_continues_as_keras_would():
    import keras

    from tests.reference import make_case

    case = make_case([(4, 3), (5,)], steps=30, seed=41)
    params = [torch.nn.Parameter(x.clone()) for x in case.init]
    torch_opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    for row in case.grads[:10]:
        for p, g in zip(params, row):
            p.grad = g.clone()
        torch_opt.step()
    torch_state = copy.deepcopy(torch_opt.state_dict())
    after_torch = [p.detach().clone() for p in params]

    opt = ShardedAdam(params, learning_rate=0.05, weight_decay=0.1, jit_compile=False)
    opt.load_torch_state_dict(torch_state)
    assert opt.iterations == 10
    for row in case.grads[10:]:
        for p, g in zip(params, row):
            p.grad = g.clone()
        opt.step()

    # Keras, handed the same parameters, moments and step count, continues the same way.
    variables = [keras.Variable(x.numpy(), dtype="float32") for x in after_torch]
    kopt = keras.optimizers.Adam(learning_rate=0.05, weight_decay=0.1)
    kopt.build(variables)
    for i in range(2):
        kopt._momentums[i].assign(torch_state["state"][i]["exp_avg"].numpy())
        kopt._velocities[i].assign(torch_state["state"][i]["exp_avg_sq"].numpy())
    kopt._iterations.assign(10)
    for row in case.grads[10:]:
        kopt.apply([g.clone() for g in row], variables)
    for p, v in zip(params, variables):
        torch.testing.assert_close(p.detach(), torch.as_tensor(v.numpy()), rtol=1e-5, atol=1e-6)


def test_torch_adam_with_l2_decay_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    torch_opt = torch.optim.Adam([p], weight_decay=0.1)
    p.grad = torch.ones(3)
    torch_opt.step()
    opt = ShardedAdam([p], jit_compile=False)
    with pytest.raises(ValueError, match="uses Adam's L2 weight decay"):
        opt.load_torch_state_dict(torch_opt.state_dict())
    with pytest.raises(ValueError, match="use load_state_dict\\(\\) for a ShardedAdam's"):
        opt.load_torch_state_dict(opt.state_dict())
