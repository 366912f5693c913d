"""ShardedAdam behaves as a torch optimizer: schedulers, closures, groups, hooks, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardadam import ShardedAdam, schedules
from tests.reference import (
    SHAPES,
    assert_all_close,
    make_case,
    make_params,
    run_keras,
    run_ours,
)

CASE = make_case(SHAPES, steps=50, seed=11)


def test_is_a_torch_optimizer_with_torch_keys():
    p = torch.nn.Parameter(torch.randn(3))
    opt = ShardedAdam([p], learning_rate=0.01, beta_1=0.8, epsilon=1e-6, weight_decay=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    group = opt.param_groups[0]
    assert group["lr"] == 0.01
    assert group["betas"] == (0.8, 0.999)
    assert group["eps"] == 1e-6
    assert group["weight_decay"] == 0.1
    assert group["amsgrad"] is False


def test_keras_names_in_param_groups_map_to_torch_keys_and_match_separate_keras_runs():
    case = make_case([(4, 3), (5,), (2, 2)], steps=50, seed=2)
    params = make_params(case)
    groups = [
        {"params": [params[0], params[1]]},
        {"params": [params[2]], "learning_rate": 0.01, "beta_1": 0.7, "amsgrad": True},
    ]
    opt = ShardedAdam(groups, learning_rate=0.05, weight_decay=0.1, jit_compile=False)
    assert opt.param_groups[1]["lr"] == 0.01
    assert opt.param_groups[1]["betas"] == (0.7, 0.999)
    assert opt.param_groups[1]["amsgrad"] is True
    assert opt.param_groups[1]["weight_decay"] == 0.1
    for grads in case.grads:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    # Keras has one set of hyperparameters per optimizer: two Keras optimizers over the groups.
    first = make_case([(4, 3), (5,)], steps=0)
    first.init, first.grads = case.init[:2], [g[:2] for g in case.grads]
    second = make_case([(2, 2)], steps=0)
    second.init, second.grads = case.init[2:], [g[2:] for g in case.grads]
    k1, _ = run_keras(first, {"learning_rate": 0.05, "weight_decay": 0.1})
    k2, _ = run_keras(
        second, {"learning_rate": 0.01, "beta_1": 0.7, "amsgrad": True, "weight_decay": 0.1}
    )
    assert_all_close([p.detach() for p in params], k1 + k2, ["a", "b", "c"])


def test_step_lr_scheduler_drives_a_float_learning_rate():
    lrs = []

    def record(step, opt):
        lrs.append(opt.param_groups[0]["lr"])

    params = make_params(CASE)
    opt = ShardedAdam(list(zip(CASE.names, params)), learning_rate=0.05, jit_compile=False)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    for step, grads in enumerate(CASE.grads):
        record(step, opt)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        scheduler.step()
    assert lrs[0] == 0.05 and lrs[10] == 0.025 and lrs[49] == 0.05 * 0.5**4
    theirs, _ = run_keras(
        CASE,
        {"learning_rate": 0.05},
        before_step=lambda s, k: setattr(k, "learning_rate", lrs[s]),
    )
    assert_all_close([p.detach() for p in params], theirs, CASE.names)


def test_one_cycle_lr_writes_lr_and_betas_that_the_step_uses():
    seen = []
    params = make_params(CASE)
    opt = ShardedAdam(list(zip(CASE.names, params)), learning_rate=0.05, jit_compile=False)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=len(CASE.grads))
    for grads in CASE.grads:
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        scheduler.step()
    assert len({b for _, b in seen}) > 10  # beta_1 really cycles

    def set_values(step, k):
        k.learning_rate, k.beta_1 = seen[step]

    theirs, _ = run_keras(CASE, {"learning_rate": 0.05}, before_step=set_values)
    assert_all_close([p.detach() for p in params], theirs, CASE.names)


def test_closure_is_evaluated_with_grad_and_its_loss_returned():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = ShardedAdam(model.parameters(), learning_rate=0.1, jit_compile=False)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_parameters_become_views_of_the_flat_buffer_and_keep_identity():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2))
    weights = [p for p in model.parameters()]
    values = [p.detach().clone() for p in weights]
    opt = ShardedAdam(model.named_parameters(), jit_compile=False)
    assert [p for p in model.parameters()] == weights
    (flat,) = [b.flat_param for b in opt.buffers]
    start = flat.data_ptr()
    end = start + flat.numel() * flat.element_size()
    for p, v in zip(weights, values):
        assert torch.equal(p, v)
        assert start <= p.data_ptr() < end
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    assert all(not torch.equal(p, v) for p, v in zip(weights, values))


def test_last_grad_norm_is_the_pre_clip_global_norm():
    case = make_case([(6, 4), (3,)], steps=3, seed=4)
    params = make_params(case)
    opt = ShardedAdam(params, global_clipnorm=0.01, loss_scale_factor=4.0, jit_compile=False)
    assert opt.last_grad_norm is None
    for grads in case.grads:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        expected = np.sqrt(sum(float((g.double() / 4.0).square().sum()) for g in grads))
        assert opt.last_grad_norm.item() == pytest.approx(expected, rel=1e-6)


def test_iterations_and_learning_rate_follow_keras_conventions():
    p = torch.nn.Parameter(torch.randn(3))
    schedule = schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    opt = ShardedAdam([p], learning_rate=schedule, gradient_accumulation_steps=3, jit_compile=False)
    assert opt.learning_rate == pytest.approx(0.1)
    for _ in range(7):
        p.grad = torch.ones(3)
        opt.step()
    assert opt.iterations == 2  # 7 micro-steps // 3
    assert opt.learning_rate == pytest.approx(0.1 * 0.5 ** (7 / 2))  # schedules see micro-steps
    float_opt = ShardedAdam([torch.nn.Parameter(torch.randn(2))], learning_rate=0.1)
    float_opt.learning_rate = 0.02
    assert float_opt.learning_rate == 0.02 and float_opt.param_groups[0]["lr"] == 0.02


def test_scale_loss_multiplies_by_the_factor():
    opt = ShardedAdam([torch.nn.Parameter(torch.randn(2))], loss_scale_factor=8.0)
    assert opt.scale_loss(torch.tensor(1.5)).item() == 12.0


def test_swap_moving_averages_puts_the_ema_in_and_restores_the_weights():
    params = make_params(CASE)
    _, _, opt = run_ours(
        CASE, {"learning_rate": 0.05, "use_ema": True, "jit_compile": False}, params=params
    )
    trained = [p.detach().clone() for p in params]
    averages = [opt.moving_average(p) for p in params]
    assert any(not torch.equal(a, t) for a, t in zip(averages, trained))
    with opt.swap_moving_averages():
        for p, a in zip(params, averages):
            assert torch.equal(p, a)
    for p, t in zip(params, trained):
        assert torch.equal(p, t)


def test_add_param_group_trains_the_new_parameters_with_the_global_step():
    first = torch.nn.Parameter(torch.randn(4))
    opt = ShardedAdam([first], learning_rate=0.1, jit_compile=False)
    for _ in range(3):
        first.grad = torch.ones(4)
        opt.step()
    late = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt.add_param_group({"params": [late], "learning_rate": 0.05, "beta_2": 0.99})
    grads = [torch.tensor([0.5, -1.0, 2.0]) * (k + 1) for k in range(4)]
    for g in grads:
        first.grad, late.grad = torch.ones(4), g.clone()
        opt.step()
    # Keras's formula in float32, continuing from the optimizer's step counter (t = 4..7).
    p, m, v = (
        np.array([1.0, -2.0, 3.0], np.float32),
        np.zeros(3, np.float32),
        np.zeros(3, np.float32),
    )
    b1, b2, lr, eps = np.float32(0.9), np.float32(0.99), np.float32(0.05), np.float32(1e-7)
    for t, g in enumerate(grads, start=4):
        g = g.numpy()
        m = m * b1 + g * np.float32(1 - 0.9)
        v = v * b2 + g * g * np.float32(1 - 0.99)
        alpha = lr * np.sqrt(1 - b2 ** np.float32(t)) / (1 - b1 ** np.float32(t))
        p = p - m * alpha / (np.sqrt(v) + eps)
    np.testing.assert_allclose(late.detach().numpy(), p, rtol=1e-5, atol=1e-6)


def test_low_precision_parameters_update_an_fp32_master_as_keras_does():
    gen = torch.Generator().manual_seed(7)
    shapes = [(6, 5), (9,)]
    case = make_case(shapes, steps=40, seed=8)
    # Values a bf16 tensor holds exactly, so both sides start from the same numbers.
    case.init = [x.bfloat16().float() for x in case.init]
    case.grads = [[g.bfloat16().float() for g in row] for row in case.grads]
    del gen
    theirs, _ = run_keras(case, {"learning_rate": 0.05, "weight_decay": 0.1})
    for dtype in (torch.bfloat16, torch.float16):
        params = [torch.nn.Parameter(x.to(dtype)) for x in case.init]
        opt = ShardedAdam(params, learning_rate=0.05, weight_decay=0.1, jit_compile=False)
        for row in case.grads:
            for p, g in zip(params, row):
                p.grad = g.to(dtype)
            opt.step()
        for p, t in zip(params, theirs):
            master = opt.state[p]["Adam/master"]
            assert master.dtype == torch.float32
            torch.testing.assert_close(master, t, rtol=1e-5, atol=1e-6)
            assert torch.equal(p.detach(), master.to(dtype))


def test_float64_parameters_run_in_float64_like_keras():
    case = make_case([(4, 4), (3,)], steps=50, seed=9)
    import keras

    # Keras stores a float learning rate in a float32 variable; 2**-4 is exact in both.

    variables = [keras.Variable(x.double().numpy(), dtype="float64") for x in case.init]
    kopt = keras.optimizers.Adam(learning_rate=0.0625, amsgrad=True)
    params = [torch.nn.Parameter(x.double()) for x in case.init]
    opt = ShardedAdam(params, learning_rate=0.0625, amsgrad=True, jit_compile=False)
    for row in case.grads:
        kopt.apply([g.double() for g in row], variables)
        for p, g in zip(params, row):
            p.grad = g.double()
        opt.step()
    for p, v in zip(params, variables):
        torch.testing.assert_close(p.detach(), torch.as_tensor(v.numpy()), rtol=1e-12, atol=1e-14)


def test_a_buffer_without_padding_steps():
    # 32 elements fill two aligned blocks exactly: the layout has no padding at all.
    p = torch.nn.Parameter(torch.ones(32))
    opt = ShardedAdam([p], learning_rate=0.5, jit_compile=False)
    assert opt.buffers[0].layout.padding() == ()
    p.grad = torch.ones(32)
    opt.step()
    # Step 1 with g = 1, in float32 as Keras: alpha = lr sqrt(1 - b2) / (1 - b1), m = 1 - b1,
    # v = 1 - b2 (from the Python doubles), epsilon added to sqrt(v).
    f32 = np.float32
    alpha = f32(0.5) * np.sqrt(f32(1) - f32(0.999)) / (f32(1) - f32(0.9))
    m, v = f32(1 - 0.9), f32(1 - 0.999)
    expected = float(f32(1) - m * alpha / (np.sqrt(v) + f32(1e-7)))
    torch.testing.assert_close(p.detach(), torch.full((32,), expected), rtol=1e-6, atol=1e-7)


def test_a_group_added_mid_training_starts_its_average_at_its_value():
    first = torch.nn.Parameter(torch.zeros(3))
    opt = ShardedAdam([first], learning_rate=0.1, use_ema=True, jit_compile=False)
    first.grad = torch.ones(3)
    opt.step()
    late = torch.nn.Parameter(torch.full((2,), 4.0))
    opt.add_param_group({"params": [late]})
    assert torch.equal(opt.moving_average(late), late.detach())
    first.grad = torch.ones(3)
    opt.step()  # late has no gradient: unchanged, and its average stays at its value
    assert torch.equal(opt.moving_average(late), torch.full((2,), 4.0))


def test_loading_keeps_the_callers_learning_rate_tensor():
    lr = torch.tensor(0.1)
    p = torch.nn.Parameter(torch.randn(3))
    opt = ShardedAdam([p], learning_rate=lr, jit_compile=False)
    saved = ShardedAdam([torch.nn.Parameter(torch.randn(3))], learning_rate=0.02).state_dict()
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.02)


def test_weight_decay_name_patterns_apply_to_groups_added_later():
    first = torch.nn.Parameter(torch.ones(2))
    opt = ShardedAdam([("a.weight", first)], learning_rate=0.1, weight_decay=0.5, jit_compile=False)
    opt.exclude_from_weight_decay(var_names=["bias$"])
    late_weight, late_bias = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [("late.weight", late_weight), ("late.bias", late_bias)]})
    for p in (first, late_weight, late_bias):
        p.grad = torch.zeros_like(p)  # a zero gradient: only the decay moves a parameter
    opt.step()
    assert torch.allclose(late_weight.detach(), torch.full((3,), 1 - 0.5 * 0.1))
    assert torch.equal(late_bias.detach(), torch.ones(3))
