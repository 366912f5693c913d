"""Sharded across gloo ranks, ShardedAdam equals Keras's Adam on the rank-averaged gradients."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.spawn import run_ranks
from tests.reference import Case, assert_all_close, make_case, run_keras

SHAPES = [(33, 17), (), (1,), (7,), (5, 3), (2, 3, 4), (40,)]
STEPS = 30

CONFIGS = {
    "amsgrad+decay+exclusions+clipnorm+ema_overwrite": (
        {
            "learning_rate": 0.05,
            "amsgrad": True,
            "weight_decay": 0.1,
            "clipnorm": 1.0,
            "use_ema": True,
            "ema_overwrite_frequency": 4,
        },
        {"var_names": ["bias$"]},
    ),
    "global_clip+accumulation+loss_scale": (
        {
            "learning_rate": 0.05,
            "global_clipnorm": 2.0,
            "gradient_accumulation_steps": 2,
            "loss_scale_factor": 16.0,
        },
        None,
    ),
    "clipvalue+ema": ({"learning_rate": 0.05, "clipvalue": 0.3, "use_ema": True}, None),
}


def rank_case(rank: int) -> Case:
    """Each rank's own gradients; some parameters miss gradients on some ranks only."""
    missing = {s: {1} for s in range(0, STEPS, 3)}  # param 1 on every rank at these steps
    if rank == 1:
        for s in range(1, STEPS, 4):
            missing.setdefault(s, set()).add(3)  # param 3 on rank 1 only
    return make_case(SHAPES, steps=STEPS, seed=100 + rank, missing=missing)


def averaged_case(world_size: int) -> Case:
    """What one process sees: the mean over ranks, a missing gradient counting as zero."""
    cases = [rank_case(r) for r in range(world_size)]
    grads = []
    for step in range(STEPS):
        row = []
        for i in range(len(SHAPES)):
            present = [c.grads[step][i] for c in cases if c.grads[step][i] is not None]
            row.append(None if not present else sum(present) / world_size)
        grads.append(row)
    base = make_case(SHAPES, steps=0, seed=7)
    return Case(base.names, base.init, grads)


def train_sharded(rank: int, world_size: int, configs: dict) -> dict:
    from shardadam import ShardedAdam

    base = make_case(SHAPES, steps=0, seed=7)
    mine = rank_case(rank)
    results = {}
    for name, (kwargs, exclude) in configs.items():
        params = [torch.nn.Parameter(x.clone()) for x in base.init]
        opt = ShardedAdam(list(zip(base.names, params)), jit_compile=False, align_numel=4, **kwargs)
        assert opt.world_size == world_size
        if exclude:
            opt.exclude_from_weight_decay(var_names=exclude["var_names"])
        for row in mine.grads:
            for p, g in zip(params, row):
                p.grad = None if g is None else g.clone()
            opt.step()
        averages = [opt.moving_average(p) for p in params] if kwargs.get("use_ema") else None
        owned = sum(s.exp_avg.numel() for s in opt.shard_states)
        results[name] = ([p.detach().clone() for p in params], averages, owned)
    return results


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sharded_equals_keras_on_averaged_gradients(world_size):
    per_rank = run_ranks(world_size, train_sharded, CONFIGS)
    reference_case = averaged_case(world_size)
    for name, (kwargs, exclude) in CONFIGS.items():
        theirs, their_avg = run_keras(reference_case, kwargs, exclude=exclude)
        total_numel = sum(x.numel() for x in reference_case.init)
        for rank, results in enumerate(per_rank):
            params, averages, owned_numel = results[name]
            assert_all_close(
                params, theirs, [f"{name} rank {rank} {n}" for n in reference_case.names]
            )
            if averages is not None:
                assert_all_close(averages, their_avg, reference_case.names)
            # Each rank keeps the state of about 1/world_size of the elements.
            assert owned_numel <= total_numel / world_size + 4 * len(SHAPES) + 4
