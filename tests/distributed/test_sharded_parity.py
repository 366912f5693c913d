"""ShardedAdam across gloo ranks: each rank feeds its own gradients, and every rank ends with
the parameters of Keras's Adam (and of one ShardedAdam process) applying the averaged gradient.

One spawn per world size runs every case (spawning costs seconds here); the test functions
compare the collected results.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed.backward_cases import BACKWARD_CASES, train_reference, train_sharded
from tests.distributed.spawn import run_ranks
from tests.reference import (
    Case,
    assert_all_close,
    make_case,
    resolve_schedules,
    run_keras,
    run_ours,
)

SHAPES = [(33, 17), (), (1,), (7,), (5, 3), (2, 3, 4), (40,)]
"""A tensor cut by shard boundaries, tensors smaller than the world size, odd sizes."""
STEPS = 30
TINY_BUCKETS = 0.001  # MiB: several buckets, each sharded on its own

CASES = {
    "amsgrad+decay+exclusions+clipnorm+ema_overwrite+finalize": dict(
        kwargs={
            "learning_rate": 0.05,
            "amsgrad": True,
            "weight_decay": 0.1,
            "clipnorm": 1.0,
            "use_ema": True,
            "ema_overwrite_frequency": 4,
        },
        exclude={"var_names": ["bias$"]},
        finalize=True,
        sharding={"stage": 2, "comm": "auto", "bucket_cap_mb": TINY_BUCKETS},
    ),
    "global_clip+accumulation+loss_scale": dict(
        kwargs={
            "learning_rate": 0.05,
            "global_clipnorm": 2.0,
            "gradient_accumulation_steps": 2,
            "loss_scale_factor": 16.0,
        },
        sharding={"stage": 2, "comm": "native"},
    ),
    "clipvalue+ema+cosine_restarts": dict(
        kwargs={"learning_rate": "cosine_restarts", "clipvalue": 0.3, "use_ema": True},
        sharding={"stage": 1, "comm": "all_reduce", "bucket_cap_mb": TINY_BUCKETS},
    ),
    "exponential+decay": dict(
        kwargs={"learning_rate": "exponential", "weight_decay": 0.2},
        sharding={"stage": 2, "comm": "all_reduce"},
    ),
    "polynomial+amsgrad+pairwise": dict(
        kwargs={"learning_rate": "polynomial", "amsgrad": True},
        sharding={"stage": 2, "comm": "pairwise", "bucket_cap_mb": TINY_BUCKETS},
    ),
    "defaults+stage1+ring": dict(
        kwargs={"learning_rate": 0.05},
        sharding={"stage": 1, "comm": "ring", "bucket_cap_mb": TINY_BUCKETS},
    ),
    "bf16+decay": dict(
        kwargs={"learning_rate": 0.05, "weight_decay": 0.1},
        sharding={"stage": 2, "comm": "ring", "bucket_cap_mb": TINY_BUCKETS},
        dtype=torch.bfloat16,
    ),
}
COUNTED = [
    (stage, mode) for stage in (1, 2) for mode in ("native", "ring", "pairwise", "all_reduce")
]


def rank_case(rank: int, dtype: torch.dtype = torch.float32) -> Case:
    """Each rank's own gradients; some parameters miss gradients on some ranks only."""
    missing = {s: {1} for s in range(0, STEPS, 3)}  # param 1 on every rank at these steps
    if rank == 1:
        for s in range(1, STEPS, 4):
            missing.setdefault(s, set()).add(3)  # param 3 on rank 1 only
    case = make_case(SHAPES, steps=STEPS, seed=100 + rank, missing=missing)
    case.grads = [[None if g is None else g.to(dtype) for g in row] for row in case.grads]
    return case


def initial_case(dtype: torch.dtype = torch.float32) -> Case:
    case = make_case(SHAPES, steps=0, seed=7)
    case.init = [x.to(dtype).float() for x in case.init]  # representable in dtype
    return case


def averaged_case(world_size: int, dtype: torch.dtype = torch.float32) -> Case:
    """What one process sees: the mean over ranks, a missing gradient counting as zero."""
    cases = [rank_case(r, dtype) for r in range(world_size)]
    grads = []
    for step in range(STEPS):
        row = []
        for i in range(len(SHAPES)):
            present = [c.grads[step][i].float() for c in cases if c.grads[step][i] is not None]
            row.append(None if not present else sum(present) / world_size)
        grads.append(row)
    base = initial_case(dtype)
    return Case(base.names, base.init, grads)


def train_case(rank: int, spec: dict) -> dict:
    from shardadam import ShardedAdam, schedules

    dtype = spec.get("dtype", torch.float32)
    base = initial_case(dtype)
    params = [torch.nn.Parameter(x.to(dtype)) for x in base.init]
    kwargs = resolve_schedules(spec["kwargs"], schedules)
    opt = ShardedAdam(
        list(zip(base.names, params)),
        jit_compile=False,
        align_numel=4,
        **kwargs,
        **spec["sharding"],
    )
    if spec.get("exclude"):
        opt.exclude_from_weight_decay(var_names=spec["exclude"]["var_names"])
    for row in rank_case(rank, dtype).grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
        opt.zero_grad()
    averages = [opt.moving_average(p) for p in params] if kwargs.get("use_ema") else None
    if spec.get("finalize"):
        opt.finalize_variable_values()
    masters = None
    if dtype != torch.float32:
        masters = [opt.state[p].get("Adam/master") for p in params]
    return {
        "params": [p.detach().float().clone() for p in params],
        "averages": averages,
        "masters": masters,
        "memory": opt.memory_report(),
        "buffers": len(opt.buffers),
        "padded_numel": sum(b.layout.padded_numel for b in opt.buffers),
    }


def count_one_step(rank: int, stage: int, mode: str) -> dict:
    """Collectives (name, elements) of one step after a warm-up step, through patched dist."""
    import torch.distributed as dist

    from shardadam import ShardedAdam

    base = initial_case()
    params = [torch.nn.Parameter(x.clone()) for x in base.init]
    opt = ShardedAdam(
        list(zip(base.names, params)),
        jit_compile=False,
        clipnorm=1.0,
        stage=stage,
        comm=mode,
        bucket_cap_mb=TINY_BUCKETS,
    )
    grads = make_case(SHAPES, steps=2, seed=200 + rank).grads  # every parameter has one
    calls = []
    names = [
        "all_reduce",
        "reduce_scatter_tensor",
        "all_gather_single",
        "all_gather_into_tensor",
        "broadcast",
        "isend",
        "irecv",
        "all_gather_object",
    ]
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            numel = max((a.numel() for a in args if isinstance(a, torch.Tensor)), default=0)
            calls.append((name, numel))
            return fn(*args, **kwargs)

        return wrapper

    for step in range(2):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        if step == 1:
            for n, fn in originals.items():
                setattr(dist, n, counting(n, fn))
        try:
            opt.step()
        finally:
            for n, fn in originals.items():
                setattr(dist, n, fn)
    return {
        "calls": calls,
        "bucket_numels": [b.layout.padded_numel for b in opt.buffers],
        "full_grad_bytes": opt.memory_report()["full_grad_buffers"],
        "comm_bytes": opt.memory_report()["comm_buffers"],
        "element_size": opt.buffers[0].flat_param.element_size(),
    }


def mismatched_model(rank: int, world_size: int) -> str:
    """The last rank's second parameter is transposed: construction must raise on every rank."""
    from shardadam import ShardedAdam

    shape = (5, 4) if rank == world_size - 1 else (4, 5)
    named = [
        ("a", torch.nn.Parameter(torch.zeros(3))),
        ("b", torch.nn.Parameter(torch.zeros(shape))),
    ]
    try:
        ShardedAdam(named, jit_compile=False)
    except RuntimeError as error:
        return str(error)
    return "no error"


def resume_case(rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(uninterrupted, resumed from a state_dict taken mid-accumulation) parameters."""
    import copy

    from shardadam import ShardedAdam

    base = initial_case()
    kwargs = dict(
        learning_rate=0.05,
        amsgrad=True,
        use_ema=True,
        ema_overwrite_frequency=3,
        gradient_accumulation_steps=3,
        jit_compile=False,
        stage=2,
        bucket_cap_mb=TINY_BUCKETS,
    )
    grads = rank_case(rank).grads

    def run(params, opt, rows):
        for row in rows:
            for p, g in zip(params, row):
                p.grad = None if g is None else g.clone()
            opt.step()
            opt.zero_grad()

    params = [torch.nn.Parameter(x.clone()) for x in base.init]
    opt = ShardedAdam(list(zip(base.names, params)), **kwargs)
    run(params, opt, grads[:11])
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    run(params, opt, grads[11:20])
    resumed = [torch.nn.Parameter(x) for x in saved_params]
    opt2 = ShardedAdam(list(zip(base.names, resumed)), **kwargs)
    opt2.load_state_dict(saved)
    run(resumed, opt2, grads[11:20])
    return [p.detach() for p in params], [p.detach() for p in resumed]


CONSOLIDATE_KWARGS = dict(
    learning_rate="cosine_restarts",
    amsgrad=True,
    use_ema=True,
    weight_decay=0.1,
    gradient_accumulation_steps=2,
    jit_compile=False,
)
CONSOLIDATE_AT = 13  # micro-steps: inside an accumulation cycle


def consolidate_case(rank: int) -> dict | None:
    """Train sharded, then gather the one-process state_dict on rank 0."""
    from shardadam import ShardedAdam, schedules

    base = initial_case()
    params = [torch.nn.Parameter(x.clone()) for x in base.init]
    kwargs = resolve_schedules(CONSOLIDATE_KWARGS, schedules)
    opt = ShardedAdam(list(zip(base.names, params)), bucket_cap_mb=TINY_BUCKETS, **kwargs)
    opt.exclude_from_weight_decay(var_names=["bias$"])
    for row in rank_case(rank).grads[:CONSOLIDATE_AT]:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
        opt.zero_grad()
    consolidated = opt.consolidated_state_dict(to_rank=0)
    if rank != 0:
        assert consolidated is None
        return None
    return {"state_dict": consolidated, "params": [p.detach().clone() for p in params]}


def run_everything(rank: int, world_size: int) -> dict:
    results = {name: train_case(rank, spec) for name, spec in CASES.items()}
    results["counts"] = {key: count_one_step(rank, *key) for key in COUNTED}
    results["mismatch"] = mismatched_model(rank, world_size) if world_size > 1 else None
    results["resume"] = resume_case(rank)
    results["consolidated"] = consolidate_case(rank)
    results["backward"] = {name: train_sharded(rank, spec) for name, spec in BACKWARD_CASES.items()}
    return results


@functools.cache
def results_at(world_size: int) -> list[dict]:
    return run_ranks(world_size, run_everything)


WORLD_SIZES = [1, 2, 3, 4]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_rank_matches_keras_and_one_process(world_size):
    per_rank = results_at(world_size)
    for name, spec in CASES.items():
        dtype = spec.get("dtype", torch.float32)
        reference = averaged_case(world_size, dtype)
        import keras

        keras_kwargs = resolve_schedules(spec["kwargs"], keras.optimizers.schedules)
        theirs, their_avg = run_keras(
            reference,
            keras_kwargs,
            exclude=spec.get("exclude"),
            finalize=spec.get("finalize", False),
        )
        single, _, _ = run_ours(
            reference,
            {
                **resolve_schedules(spec["kwargs"], __import__("shardadam").schedules),
                "jit_compile": False,
            },
            exclude=spec.get("exclude"),
            finalize=spec.get("finalize", False),
        )
        for rank, results in enumerate(per_rank):
            got = results[name]
            labels = [f"W={world_size} rank {rank} {name} {n}" for n in reference.names]
            if dtype == torch.float32:
                assert_all_close(got["params"], theirs, labels)
                assert_all_close(got["params"], single, labels)
                if got["averages"] is not None and not spec.get("finalize"):
                    assert_all_close(got["averages"], their_avg, labels)
            else:
                # bf16 gradients are reduced in bf16: a looser match to the fp32-master
                # reference, and the parameter is its master rounded to bf16.
                for p, t, label in zip(got["params"], theirs, labels):
                    torch.testing.assert_close(p, t, rtol=2e-2, atol=2e-2, msg=label)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_state_bytes_per_rank_are_one_over_world_size(world_size):
    numel = sum(torch.Size(s).numel() for s in SHAPES)
    name = "amsgrad+decay+exclusions+clipnorm+ema_overwrite+finalize"
    for results in results_at(world_size):
        got = results[name]
        # m, v, AMSGrad max and EMA, fp32, for this rank's shard of every (padded) buffer.
        assert got["memory"]["optimizer_state"] == 4 * 4 * got["padded_numel"] // world_size
        padding = got["padded_numel"] - numel
        assert padding <= len(SHAPES) * 4 + got["buffers"] * world_size * 4
        assert got["memory"]["optimizer_state"] <= 16 * (numel / world_size + padding)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_each_element_crosses_the_wire_once_in_the_pattern_of_the_setting(world_size):
    for rank, results in enumerate(results_at(world_size)):
        for (stage, mode), counted in results["counts"].items():
            calls, buckets = counted["calls"], counted["bucket_numels"]
            # Small all-reduces next to the big transfers: the step's flags (a gradient per
            # parameter, late gradients per bucket, a failed rank) and clipping norms.
            big = [(n, e) for n, e in calls if n != "all_reduce" or e in buckets]
            small = [e for n, e in calls if n == "all_reduce" and e not in buckets]
            assert len(small) <= 3 and max(small) <= len(SHAPES) + len(buckets) + 1, small
            gather = (
                "all_gather_single"
                if "all_gather_single" in {n for n, _ in calls}
                else ("all_gather_into_tensor")
            )
            chunks = sorted(n // world_size for n in buckets for _ in range(world_size - 1))
            expected = []
            if stage == 1:
                expected += [("all_reduce", n) for n in buckets]
            elif mode == "native":
                expected += [("reduce_scatter_tensor", n) for n in buckets]
            elif mode in ("ring", "pairwise"):
                expected += [("isend", c) for c in chunks] + [("irecv", c) for c in chunks]
            else:
                expected += [("all_reduce", n) for n in buckets]
            if mode == "native":
                expected += [(gather, n) for n in buckets]
            elif mode in ("ring", "pairwise"):
                expected += [("isend", c) for c in chunks] + [("irecv", c) for c in chunks]
            else:
                expected += [
                    ("broadcast", n // world_size) for n in buckets for _ in range(world_size)
                ]
            assert sorted(big) == sorted(expected), (rank, stage, mode)
            if stage == 2:
                assert counted["full_grad_bytes"] == 0  # no full gradient after the reduction
            # Between steps a rank keeps no receive buffer either (their sizes while in flight:
            # test_grad_memory).
            assert counted["comm_bytes"] == 0


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_mismatched_models_raise_on_every_rank(world_size):
    for rank, results in enumerate(results_at(world_size)):
        message = results["mismatch"]
        assert f"rank {rank}/{world_size}" in message, message
        assert "parameter 'b' has shape (5, 4)" in message
        assert f"on rank {world_size - 1} but rank 0 has 'b' with shape (4, 5)" in message
        assert "every rank must pass the same parameters in the same order" in message


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_training_through_backward_hooks_equals_one_process(world_size):
    for name, spec in BACKWARD_CASES.items():
        reference = train_reference(world_size, spec)
        for rank, results in enumerate(results_at(world_size)):
            got = results["backward"][name]
            for param_name, value in reference.items():
                torch.testing.assert_close(
                    got["params"][param_name],
                    value,
                    rtol=1e-5,
                    atol=1e-6,
                    msg=lambda m, label=f"W={world_size} rank {rank} {name} {param_name}": (
                        f"{label}: {m}"
                    ),
                )
            if world_size > 1 and spec["sharding"]["stage"] == 2:
                # Stage 2 consumes gradients during backward (on update steps) and keeps
                # no full gradient buffer after the reduction.
                accumulating = "kwargs" in spec
                assert got["grads_after_backward"] == [
                    accumulating and s % 2 == 0 for s in range(8)
                ]
                assert got["full_grad_bytes"] == 0
                if "kwargs" not in spec and "no_sync" not in spec:
                    # Note [reductions in flight at stage 2]: once backward returned, at most
                    # two buckets' full buffers (and receive buffers) of the whole model's.
                    two = sum(sorted(got["bucket_bytes"])[-2:])
                    assert len(got["bucket_bytes"]) > 3  # else the bound says nothing
                    for full, received in got["held_after_backward"]:
                        assert full <= two, (name, full, got["bucket_bytes"])
                        assert received <= two * (world_size - 1) // world_size + 1
            # A second backward before step() adds up (numbers: test_robustness), and
            # opt.zero_grad() then drops both.
            assert got["second_backward_error"] == ""
            if "kwargs" not in spec:  # (with accumulation that step only accumulates)
                # The added group's first update, at the optimizer's step t = 9: decay, then
                # m / sqrt(v) = (1 - b1) / sqrt(1 - b2) for a gradient of one sign.
                t, lr = 9, 0.5
                alpha = lr * (1 - 0.999**t) ** 0.5 / (1 - 0.9**t)
                expected = (1 - 0.1 * lr) - alpha * 0.1 / 0.001**0.5
                torch.testing.assert_close(
                    got["extra_after_step"], torch.full((5,), expected), rtol=0, atol=1e-4
                )
                assert got["fresh_optimizer_moved"]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_resuming_from_a_sharded_state_dict_is_bit_identical(world_size):
    for results in results_at(world_size):
        uninterrupted, resumed = results["resume"]
        for a, b in zip(uninterrupted, resumed):
            assert torch.equal(a, b)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_consolidated_state_dict_continues_in_one_process(world_size):
    from shardadam import ShardedAdam, schedules

    saved = results_at(world_size)[0]["consolidated"]
    reference = averaged_case(world_size)

    def fresh(init):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        kwargs = resolve_schedules(CONSOLIDATE_KWARGS, schedules)
        return params, ShardedAdam(list(zip(reference.names, params)), **kwargs)

    def train(params, opt, rows):
        for row in rows:
            for p, g in zip(params, row):
                p.grad = None if g is None else g.clone()
            opt.step()

    params, opt = fresh(reference.init)  # uninterrupted, one process, averaged gradients
    opt.exclude_from_weight_decay(var_names=["bias$"])
    train(params, opt, reference.grads)
    resumed, opt2 = fresh(saved["params"])  # exclusions come from the state_dict
    opt2.load_state_dict(saved["state_dict"])
    train(resumed, opt2, reference.grads[CONSOLIDATE_AT:])
    assert_all_close([p.detach() for p in resumed], [p.detach() for p in params], reference.names)
