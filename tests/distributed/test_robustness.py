"""The paths users take across ranks (2 gloo ranks, a 20 s process-group timeout so that a
hang fails): each gives the numbers of one process on the mean loss, or the same clear error
on every rank."""

from __future__ import annotations

import functools

import torch

from shardadam import ShardedAdam
from tests.distributed import robustness_cases as cases
from tests.distributed.spawn import run_ranks


@functools.cache
def results() -> list[dict]:
    return run_ranks(2, cases.run_all, timeout_s=20)


def assert_params_equal(got, expected, atol=1e-6):
    for p, q in zip(got, expected):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=atol)


def _logged_losses(cls: type) -> list[float]:
    """The summed loss of both ranks at each step, as the logging all_reduce gives it."""
    logged = []
    model = cases.TwoBranch()
    opt = cls(model.parameters(), learning_rate=0.05, jit_compile=False)
    for step in range(2):
        opt.zero_grad()
        losses = [cases.rank_loss(model, r, step) for r in (0, 1)]
        logged.append(float(sum(loss.detach() for loss in losses)))
        (sum(losses) / 2).backward()
        opt.step()
    return logged


def test_user_collectives_between_backward_and_step_meet_the_same_sequence():
    members = {"Adam": ShardedAdam, **cases.STEP_COLLECTIVES}
    expected = {name: cases.one_process(2, cls=cls) for name, cls in members.items()}
    logged = {name: _logged_losses(cls) for name, cls in members.items()}
    for rank_results in results():
        for setting, got in rank_results["user_collective_between_backward_and_step"].items():
            member = setting[2]
            assert_params_equal(got["params"], expected[member])
            assert all(abs(a - b) < 1e-5 for a, b in zip(got["logged"], logged[member])), setting


def test_zero_grad_and_a_failing_step_neither_hang_nor_lose_gradients():
    expected = cases.one_process(3)
    r0, r1 = (r["zero_grad_and_failing_step"] for r in results())
    assert "Invalid learning_rate (param group 0): -1.0" in r0["both"] == r1["both"]
    assert r0["one"].startswith("RuntimeError: rank 0/2: step() failed on rank 1")
    assert "fix the cause on every rank and call step() again" in r0["one"]
    assert r1["one"].startswith("ValueError: Invalid learning_rate (param group 0): -1.0")
    assert_params_equal(r0["params"], expected)
    assert_params_equal(r1["params"], expected)


def one_process_unfreezing() -> list[torch.Tensor]:
    model = cases.TwoBranch()
    cases.freeze_as_scheduled(model, 0)
    opt = ShardedAdam(model.named_parameters(), learning_rate=0.05, jit_compile=False)
    for step in range(4):
        cases.freeze_as_scheduled(model, step)
        opt.zero_grad()
        ((cases.rank_loss(model, 0, step) + cases.rank_loss(model, 1, step)) / 2).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_parameters_unfrozen_later_reduce_during_backward():
    expected = one_process_unfreezing()
    for rank_results in results():
        got = rank_results["unfreezing"]
        assert got["released"] == [True, True, True, True]  # step 0: frozen, no grad at all
        assert_params_equal(got["params"], expected)


def test_several_gradients_for_one_parameter_add_up():
    reentrant = cases.one_process(3, reentrant=True)
    twice = cases.one_process(3, backwards=2)
    dropped = cases.one_process(3)
    for rank_results in results():
        got = rank_results["several_gradients_per_backward"]
        assert_params_equal(got["reentrant"], reentrant)
        assert_params_equal(got["twice1"], twice)
        assert_params_equal(got["twice2"], twice)
        assert_params_equal(got["no_sync"], twice)
        assert got["no_sync_kept"] == [True, True, True]
        assert_params_equal(got["dropped"], dropped)


def test_rebuilding_leaves_one_set_of_hooks_and_close_removes_it():
    expected = cases.one_process(2)
    for rank_results in results():
        got = rank_results["hooks_and_rebuilding"]
        assert got["counts"] == [1, 1, 1, 0, 0]
        assert_params_equal(got["params"], expected)


def test_refusals_reach_every_rank():
    r0, r1 = (r["refusals"] for r in results())
    for got in (r0, r1):
        assert "GradScaler cannot drive ShardedAdam" in got["grad_scaler"]
        assert (
            "the first extra one is 'extra.w' (shape (3,), torch.float32) on rank 1"
            in (got["extra"])
        )
        assert got["no_grads"] == {
            "warned": ["No gradients provided for any variable."],
            "unchanged": True,
            "iterations": 0,
        }
    assert "(torch.float64 on cpu) is no longer a view of ShardedAdam's flat" in r1["converted"]
    assert r0["converted"].startswith("rank 0/2: step() failed on rank 1")


def test_consolidated_accumulators_cover_every_rank():
    got = results()[0]["accumulators"]
    model = cases.TwoBranch()
    params = list(model.parameters())
    sums = [torch.zeros_like(p) for p in params]
    for rank in (0, 1):
        for step in range(2):
            model.zero_grad()
            cases.rank_loss(model, rank, step).backward()
            for s, p in zip(sums, params):
                if p.grad is not None:
                    s += p.grad / 2
    assert sorted(got) == list(range(len(params)))
    for i, s in enumerate(sums):
        torch.testing.assert_close(got[i], s, rtol=1e-5, atol=1e-7)
