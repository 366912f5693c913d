"""Every member of the family across gloo ranks: each rank feeds its own gradients (some missing
on some ranks only), and every rank ends with the parameters of Keras's optimizer applying the
averaged gradient. One spawn per world size runs every member and setting.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed.spawn import run_ranks
from tests.distributed.test_sharded_parity import averaged_case, initial_case, rank_case
from tests.reference import assert_all_close, run_keras
from tests.unit.test_family_keras import MEMBERS, OWN_ARGUMENTS

TINY_BUCKETS = 0.001  # MiB: several buckets, each sharded on its own

SETTINGS = {
    "own+decay+clipnorm+ema_overwrite, stage 2": dict(
        kwargs={
            "learning_rate": 0.05,
            "weight_decay": 0.1,
            "clipnorm": 1.0,
            "use_ema": True,
            "ema_overwrite_frequency": 4,
        },
        own=True,
        exclude={"var_names": ["bias$"]},
        sharding={"stage": 2, "comm": "auto", "bucket_cap_mb": TINY_BUCKETS},
    ),
    "global_clipnorm+accumulation, stage 1": dict(
        kwargs={"learning_rate": 0.05, "global_clipnorm": 2.0, "gradient_accumulation_steps": 2},
        sharding={"stage": 1, "comm": "ring", "bucket_cap_mb": TINY_BUCKETS},
    ),
}


def _kwargs(member: str, setting: dict) -> dict:
    own = OWN_ARGUMENTS.get(member, {}) if setting.get("own") else {}
    return {**setting["kwargs"], **own}


def train_member(rank: int, member: str, setting: dict) -> dict:
    base = initial_case()
    params = [torch.nn.Parameter(x.clone()) for x in base.init]
    opt = MEMBERS[member](
        list(zip(base.names, params)),
        jit_compile=False,
        align_numel=4,
        **_kwargs(member, setting),
        **setting["sharding"],
    )
    if setting.get("exclude"):
        opt.exclude_from_weight_decay(var_names=setting["exclude"]["var_names"])
    for row in rank_case(rank).grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
        opt.zero_grad()
    averages = [opt.moving_average(p) for p in params] if opt.options.use_ema else None
    return {"params": [p.detach().clone() for p in params], "averages": averages}


def train_all(rank: int, world_size: int) -> dict:
    return {
        (member, name): train_member(rank, member, setting)
        for member in sorted(MEMBERS)
        for name, setting in SETTINGS.items()
    }


@functools.cache
def results(world_size: int) -> list[dict]:
    return run_ranks(world_size, train_all)


@functools.cache
def keras_reference(member: str, name: str, world_size: int):
    setting = SETTINGS[name]
    case = averaged_case(world_size)
    return run_keras(
        case, _kwargs(member, setting), exclude=setting.get("exclude"), keras_name=member
    )


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_member_across_ranks_matches_keras(member, name, world_size):
    expected, expected_ema = keras_reference(member, name, world_size)
    names = initial_case().names
    for rank, result in enumerate(results(world_size)):
        got = result[(member, name)]
        assert_all_close(got["params"], expected, [f"rank {rank}: {n}" for n in names])
        if expected_ema is not None:
            assert_all_close(got["averages"], expected_ema, [f"rank {rank}: {n}" for n in names])
