"""Stage 2 across ranks: the bytes held for gradients are the owned shard, plus two buckets
once backward returned (Note [reductions in flight at stage 2]), counted by memory_report()
and checked against the tensors actually alive in the process. Half the layers have no bias,
so their weights are buckets of their own whose gradients are reduced as autograd made them
(Note [gradients taken as they are] in ``reducer``). A layer unused on one rank, with a
collective of the user's between backward() and step(), gives the averaged gradients' update."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from shardadam import ShardedAdam
from tests.distributed.spawn import run_ranks

WIDTH, DEPTH, STEPS = 192, 8, 3
BUCKET_CAP_MB = 0.2  # one or two layers per bucket: eight buckets or so


def live_tensor_nbytes() -> int:
    """Bytes of every storage a live Python tensor uses, each storage once."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def grad_nbytes(report: dict) -> int:
    return sum(report[k] for k in ("grad_shards", "full_grad_buffers", "late_grad_buffers"))


def train(rank: int, world_size: int) -> dict:
    results = {mode: train_in(rank, mode) for mode in ("pairwise", "native")}
    return {"modes": results, "unused": train_with_unused_layer(rank)}


UNUSED = 3  # a bias-free layer (a bucket of its own) that rank 1 skips


def forward(model: nn.Module, x: torch.Tensor, rank: int) -> torch.Tensor:
    for i, layer in enumerate(model):
        if not (rank == 1 and i == UNUSED):
            x = layer(x)
    return x.square().mean()


def train_with_unused_layer(rank: int) -> list[torch.Tensor]:
    """Rank 1 never uses one layer, and every rank issues a collective of its own between
    backward() and step() (a logging all_reduce)."""
    model = make_model()
    opt = build(model, stage=2)
    for x in inputs_of(rank):
        forward(model, x, rank).backward()
        logged = torch.ones(1)
        torch.distributed.all_reduce(logged)
        assert logged.item() == torch.distributed.get_world_size()
        opt.step()
        opt.zero_grad()
    opt.close()
    return [p.detach().clone() for p in model.parameters()]


def averaged_by_hand(world_size: int) -> list[torch.Tensor]:
    """One process fed each step with the mean over ranks of each rank's gradients (zeros
    where a rank did not use a parameter, as DDP averages)."""
    model = make_model()
    opt = build(model)
    params = list(model.parameters())
    per_rank = [inputs_of(rank) for rank in range(world_size)]
    for step in range(STEPS):
        total = [torch.zeros_like(p) for p in params]
        for rank in range(world_size):
            loss = forward(model, per_rank[rank][step], rank)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t.add_(g)
        for p, t in zip(params, total):
            p.grad = t / world_size
        opt.step()
    return [p.detach() for p in params]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=i % 2 == 0) for i in range(DEPTH)])


def inputs_of(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return [torch.randn(4, WIDTH, generator=gen) for _ in range(STEPS)]


def build(model: nn.Module, **sharding) -> ShardedAdam:
    return ShardedAdam(
        model.parameters(),
        learning_rate=0.01,
        bucket_cap_mb=BUCKET_CAP_MB,
        jit_compile=False,
        **sharding,
    )


def train_in(rank: int, mode: str) -> dict:
    model = make_model()
    opt = build(model, stage=2, comm=mode)
    inputs = inputs_of(rank)
    shard_nbytes = sum(b.shard.numel * b.flat_param.element_size() for b in opt.buffers)
    bucket_nbytes = sorted(b.flat_param.numel() * b.flat_param.element_size() for b in opt.buffers)
    rows, adopted = [], 0
    for step in range(STEPS):
        gc.collect()
        between = opt.memory_report(), live_tensor_nbytes()
        loss = model(inputs[step]).square().mean()
        loss.backward()
        del loss  # the graph is gone; what backward left is gradients
        gc.collect()
        after_backward = opt.memory_report(), live_tensor_nbytes()
        adopted = max(adopted, len(opt._reducer._adopted))  # (private: no public view of it)
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.zero_grad()
        rows.append((between, after_backward))
    opt.close()
    params = [p.detach().clone() for p in model.parameters()]
    return {
        "shard": shard_nbytes,
        "buckets": bucket_nbytes,
        "rows": rows,
        "adopted": adopted,
        "params": params,
    }


def one_process(world_size: int) -> list[torch.Tensor]:
    """The same steps in one process: each step's batch is every rank's, whose mean loss is
    the mean of the ranks' losses."""
    model = make_model()
    opt = build(model)
    per_rank = [inputs_of(rank) for rank in range(world_size)]
    for step in range(STEPS):
        model(torch.cat([inputs[step] for inputs in per_rank])).square().mean().backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("world_size", [2, 4])
def test_stage_2_holds_the_shard_and_two_buckets(world_size):
    reference = one_process(world_size)
    by_hand = averaged_by_hand(world_size)
    for rank, results in enumerate(run_ranks(world_size, train)):
        for value, expected in zip(results["unused"], by_hand):
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
        for mode, got in results["modes"].items():
            label = f"W={world_size} {mode} rank {rank}"
            for value, expected in zip(got["params"], reference):
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=label)
            assert got["adopted"] > 0, label  # bias-free weights: autograd's tensors reduced
            two_buckets = sum(got["buckets"][-2:])
            assert len(got["buckets"]) >= 6, got["buckets"]  # else the bound says nothing
            model_grads = sum(got["buckets"])
            for step, ((between, live_between), (after, live_after)) in enumerate(got["rows"]):
                # Between steps: the shard only (no full buffer, no spare pool buffer).
                assert grad_nbytes(between) == got["shard"], (label, step, between)
                assert between["comm_buffers"] == 0, (label, step, between)
                # Once backward returned: at most two buckets in flight, of the whole model.
                held = grad_nbytes(after) - got["shard"]
                assert held <= two_buckets < model_grads / 2, (label, step, held)
                received = after["comm_buffers"]
                assert received <= two_buckets * (world_size - 1) // world_size, (label, received)
                if mode == "native":
                    assert received == 0
                # The report is what is alive: backward added exactly those buffers.
                grown = live_after - live_between
                lent = held + received
                assert abs(grown - lent) <= 16 * 1024, (label, step, grown, lent)
                if step:  # the peak covers at least what was held at once
                    assert after["peak"] >= grad_nbytes(after) + after["param_buffers"]
