"""The eager kernel with parameters that have no gradient (Note [eager steps without some
gradients]): the same numbers as the out-of-place kernel's masks, and masks reused per step."""

from __future__ import annotations

import pytest
import torch

from shardadam import ShardedAdam, functional
from shardadam.rules.adam import adam_shard_step_, adam_shard_step_inplace_, update_scalars

N = 100
# Elements 0-9, 40-69 and 95-99 have no gradient: runs at both ends and in the middle.
HAS_GRAD = torch.ones(N, dtype=torch.bool)
HAS_GRAD[:10] = HAS_GRAD[40:70] = HAS_GRAD[95:] = False


def _state(dtype: torch.dtype, amsgrad: bool, ema: bool, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(N, generator=g)
    return {
        "param": weights.to(dtype),
        "grad": (torch.randn(N, generator=g) * HAS_GRAD).to(dtype),
        "exp_avg": torch.randn(N, generator=g) * 0.1,
        "exp_avg_sq": torch.rand(N, generator=g) * 0.1,
        "exp_avg_sq_max": torch.rand(N, generator=g) * 0.2 if amsgrad else None,
        "ema": torch.randn(N, generator=g) if ema else None,
        "master": weights.clone() if dtype != torch.float32 else None,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("ema_overwrite", [None, False, True])
def test_the_in_place_kernel_matches_the_masked_out_of_place_one(dtype, amsgrad, ema_overwrite):
    decay_mask = torch.arange(N) % 3 != 0
    scalars = update_scalars(
        1e-2, 0.9, 0.999, 1e-7, 0.01, step=3, clip_value=0.5, ema_momentum=0.9,
        ema_overwrite=bool(ema_overwrite),
    )  # fmt: skip
    results = []
    for kernel in (adam_shard_step_, adam_shard_step_inplace_):
        state = _state(dtype, amsgrad, ema_overwrite is not None, seed=1)
        before = {k: None if v is None else v.clone() for k, v in state.items()}
        grad_sq = kernel(*state.values(), decay_mask, HAS_GRAD, scalars)
        results.append((state, grad_sq))
        if ema_overwrite is not True:  # without gradients: value and moments kept
            for key in ("param", "exp_avg", "exp_avg_sq", "exp_avg_sq_max", "master"):
                if state[key] is not None:
                    kept = ~HAS_GRAD
                    assert torch.equal(state[key][kept], before[key][kept]), key
    (ours, our_sq), (theirs, their_sq) = results[1], results[0]
    for key, value in ours.items():
        if key != "grad" and value is not None:  # grad is the in-place kernel's scratch
            tolerance = 1e-2 if value.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(value, theirs[key], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(our_sq, their_sq.to(our_sq.dtype))


def test_a_frozen_parameter_reuses_one_mask_and_one_set_of_ranges():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # in the buffer, never a gradient
    opt = ShardedAdam(model.parameters(), jit_compile=False)
    masks = []
    for _ in range(3):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        masks.append(opt.buffers[0].shard_mask([0, 2, 3]))
    assert masks[0] is masks[1] is masks[2]
    runs = functional._runs_without_grad(masks[0])
    assert functional._runs_without_grad(masks[0]) is runs  # found once
    start, stop = _bias_range(opt)
    # The bias, and the buffer's alignment padding, which has no gradient either.
    assert any(r.start <= start and stop <= r.stop for r in runs)
    assert sum(r.stop - r.start for r in runs) == opt.buffers[0].shard.numel - sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def _bias_range(opt: ShardedAdam) -> tuple[int, int]:
    local = opt.buffers[0].shard_range_of(1)
    return local.slice.start, local.slice.stop
