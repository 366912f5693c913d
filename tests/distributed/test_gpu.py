"""The CUDA path: the compiled update on a GPU, and NCCL ranks (skipped without GPUs)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.spawn import run_ranks
from tests.distributed.test_sharded_parity import CASES, averaged_case, initial_case, rank_case
from tests.reference import SHAPES, assert_all_close, make_case, resolve_schedules, run_keras

pytestmark = pytest.mark.gpu
CASE_NAME = "amsgrad+decay+exclusions+clipnorm+ema_overwrite+finalize"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_update_on_cuda_matches_keras():
    from shardadam import ShardedAdam

    case = make_case(SHAPES, steps=50, seed=5)
    kwargs = {"learning_rate": 0.05, "amsgrad": True, "weight_decay": 0.1, "use_ema": True}
    theirs, _ = run_keras(case, kwargs)
    params = [torch.nn.Parameter(x.cuda()) for x in case.init]
    opt = ShardedAdam(list(zip(case.names, params)), jit_compile=True, **kwargs)
    for row in case.grads:
        for p, g in zip(params, row):
            p.grad = g.cuda()
        opt.step()
    assert_all_close([p.detach().cpu() for p in params], theirs, case.names)


def train_on_gpu(rank: int, world_size: int) -> list[torch.Tensor]:
    from shardadam import ShardedAdam, schedules

    spec = CASES[CASE_NAME]
    base = initial_case()
    params = [torch.nn.Parameter(x.cuda()) for x in base.init]
    kwargs = resolve_schedules(spec["kwargs"], schedules)
    opt = ShardedAdam(list(zip(base.names, params)), jit_compile=True, **kwargs)
    opt.exclude_from_weight_decay(var_names=spec["exclude"]["var_names"])
    for row in rank_case(rank).grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.cuda()
        opt.step()
        opt.zero_grad()
    opt.finalize_variable_values()
    return [p.detach().cpu() for p in params]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_ranks_match_keras():
    per_rank = run_ranks(2, train_on_gpu, backend="nccl")
    spec = CASES[CASE_NAME]
    theirs, _ = run_keras(averaged_case(2), spec["kwargs"], exclude=spec["exclude"], finalize=True)
    for params in per_rank:
        assert_all_close(params, theirs, initial_case().names)
