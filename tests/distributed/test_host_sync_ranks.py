"""No host sync in the steady-state step across ranks (2 gloo ranks, one spawn): the one read
is ``agree``'s, of a CPU tensor reduced over the host group (Note [host collectives] in
``comm``), also over a host group of its own, as on NCCL."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from shardadam import ShardedAdam, comm
from tests.distributed import robustness_cases as cases
from tests.distributed.spawn import run_ranks
from tests.unit.test_host_sync import EAGER_KERNEL_FLOATS, Read, forbidden, host_reads

KWARGS = {
    "learning_rate": 0.05,
    "global_clipnorm": 0.5,
    "weight_decay": 0.05,
    "use_ema": True,
    "bucket_cap_mb": cases.TINY_BUCKETS,
}
WATCHED_STEPS = 2  # after one warm-up step
AGREEMENT = Read("tolist", "reducer.py:agree", "cpu")
"""The agreement's flags, reduced over the host group."""
ALLOWED = {AGREEMENT, EAGER_KERNEL_FLOATS}
"""Eager: compiling in each spawned rank would cost 15 s; the unit test checks the compiled
step, which reads nothing."""
SETTINGS = [(stage, separate) for stage in (1, 2) for separate in (False, True)]
"""(ZeRO stage, whether the host group is one of its own)."""


def flag_reductions(opt: ShardedAdam):
    """Record, for each all_reduce inside, whether it ran on the host group, on a CPU tensor."""
    on_host = []
    all_reduce = dist.all_reduce

    def recorded(tensor, *args, group=None, **kwargs):
        on_host.append(group is opt.comm.host_group and tensor.device.type == "cpu")
        return all_reduce(tensor, *args, group=group, **kwargs)

    dist.all_reduce = recorded
    return on_host, lambda: setattr(dist, "all_reduce", all_reduce)


def train(rank: int, stage: int) -> dict:
    """Branch ``b`` unused on rank 1: the ranks agree that it has a gradient."""
    model = cases.TwoBranch()
    opt = ShardedAdam(model.named_parameters(), stage=stage, jit_compile=False, **KWARGS)
    reads, on_host = [], []
    for step in range(1 + WATCHED_STEPS):
        opt.zero_grad()
        cases.rank_loss(model, rank, step).backward()
        if not step:
            opt.step()
            continue
        step_on_host, restore = flag_reductions(opt)
        try:
            with host_reads() as step_reads:
                opt.step()
        finally:
            restore()
        reads += step_reads
        on_host.append(any(step_on_host))
    return {
        "reads": reads,
        "flags_on_host_group": on_host,
        "separate_host_group": opt.comm.host_group is not opt.comm.group,
        "params": cases.params_of(model),
    }


def failing_step(rank: int) -> dict:
    """Rank 1 fails before the agreement: every rank raises, over a host group of its own."""
    model = cases.TwoBranch()
    opt = ShardedAdam(model.named_parameters(), jit_compile=False, **KWARGS)
    cases.rank_loss(model, rank, 0).backward()
    if rank == 1:
        opt.param_groups[0]["lr"] = -1.0
    try:
        opt.step()
        error = ""
    except (RuntimeError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    opt.param_groups[0]["lr"] = KWARGS["learning_rate"]
    opt.step()  # the gradients were kept: the step the failure held back
    return {"error": error, "params": cases.params_of(model)}


def run_all(rank: int, world_size: int) -> dict:
    results = {}
    try:
        for stage, separate in SETTINGS:
            comm.FORCE_SEPARATE_HOST_GROUP = separate
            results[stage, separate] = train(rank, stage)
        comm.FORCE_SEPARATE_HOST_GROUP = True
        results["failing"] = failing_step(rank)
    finally:
        comm.FORCE_SEPARATE_HOST_GROUP = False
    return results


@functools.cache
def results() -> list[dict]:
    return run_ranks(2, run_all, timeout_s=20)


def test_a_step_across_ranks_reads_host_memory_only_at_the_agreement_and_eager_floats():
    for rank_results in results():
        for setting in SETTINGS:
            got = rank_results[setting]
            assert forbidden(got["reads"], ALLOWED) == [], setting
            assert got["reads"].count(AGREEMENT) == WATCHED_STEPS, setting
            assert got["flags_on_host_group"] == [True] * WATCHED_STEPS, setting
            assert got["separate_host_group"] == setting[1]


def test_a_host_group_of_its_own_gives_the_numbers_of_one_process():
    expected = cases.one_process(1 + WATCHED_STEPS, **KWARGS)
    for rank_results in results():
        for setting in SETTINGS:
            for got, want in zip(rank_results[setting]["params"], expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_failure_on_one_rank_reaches_every_rank_over_a_host_group_of_its_own():
    r0, r1 = (r["failing"] for r in results())
    assert r0["error"].startswith("RuntimeError: rank 0/2: step() failed on rank 1")
    assert r1["error"].startswith("ValueError: Invalid learning_rate")
    expected = cases.one_process(1, **KWARGS)
    for got in (r0["params"], r1["params"]):
        for p, q in zip(got, expected):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
