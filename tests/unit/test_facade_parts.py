"""What the facade's parts add: the rule's name in the state dict, checked on every load, and a
memory report that counts every rule's slots."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from shardadam import checkpoint
from shardadam.optimizers import (
    FAMILY,
    ShardedAdafactor,
    ShardedAdagrad,
    ShardedAdam,
    ShardedAdamW,
    ShardedFtrl,
    ShardedSGD,
)

REFUSED = (
    "the state_dict was saved by a ShardedSGD (rule 'SGD') but this is a ShardedAdam "
    "(rule 'Adam'); load it into a ShardedSGD"
)


def make(cls: type, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    opt = cls(model.named_parameters(), **{"jit_compile": False, "use_ema": True, **kwargs})
    return model, opt


def train(model, opt, steps: int) -> None:
    for step in range(steps):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def snapshot(model, opt) -> dict[str, torch.Tensor]:
    tensors = {f"model {k}": v.clone() for k, v in model.state_dict().items()}
    for i, entry in opt.state_dict()["state"].items():
        tensors.update({f"opt {i} {k}": v.clone() for k, v in entry.items()})
    return tensors


def assert_unchanged(model, opt, before: dict[str, torch.Tensor], iterations: int) -> None:
    after = snapshot(model, opt)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert opt.iterations == iterations


# ------------------------------------------------------------------ the rule in the state dict


@pytest.mark.parametrize("member", sorted(FAMILY))
def test_the_state_dict_names_the_rule(member):
    _, opt = make(FAMILY[member])
    expected = "Adam" if member == "AdamW" else member  # AdamW is Adam's rule with decay
    assert opt.state_dict()["shardadam"]["rule"] == expected


def test_a_state_dict_of_another_rule_is_refused_before_anything_changes():
    sgd_model, sgd = make(ShardedSGD, momentum=0.9)
    train(sgd_model, sgd, 2)
    model, opt = make(ShardedAdam)
    train(model, opt, 1)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=re.escape(REFUSED)):
        opt.check_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match=re.escape(REFUSED)):
        opt.load_state_dict(sgd.state_dict())
    assert_unchanged(model, opt, before, iterations=1)


def test_a_state_dict_without_its_rule_was_saved_by_adam():
    model, opt = make(ShardedAdam)
    train(model, opt, 2)
    saved = opt.state_dict()
    del saved["shardadam"]["rule"]  # as earlier versions, which had only Adam, saved it
    fresh_model, fresh = make(ShardedAdam)
    fresh.load_state_dict(saved)
    assert fresh.iterations == 2
    sgd_model, sgd = make(ShardedSGD, momentum=0.9)
    with pytest.raises(ValueError, match=r"saved by a ShardedAdam \(rule 'Adam'\) but this is a "):
        sgd.load_state_dict(saved)


def test_adam_and_adamw_share_their_rule_and_their_state():
    model, adamw = make(ShardedAdamW)
    train(model, adamw, 2)
    _, adam = make(ShardedAdam)
    adam.load_state_dict(adamw.state_dict())
    assert adam.iterations == 2
    assert adam.param_groups[0]["weight_decay"] == 0.004  # the saved hyperparameters win


def test_a_checkpoint_of_another_rule_is_refused_before_anything_changes(tmp_path):
    sgd_model, sgd = make(ShardedSGD, momentum=0.9)
    train(sgd_model, sgd, 2)
    checkpoint.save(tmp_path, model=sgd_model, optimizer=sgd)
    model, opt = make(ShardedAdam)
    train(model, opt, 1)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=re.escape(REFUSED)):
        checkpoint.load(tmp_path, model=model, optimizer=opt)
    assert_unchanged(model, opt, before, iterations=1)


# ------------------------------------------------------------------ the memory report


def unpadded_params() -> list[torch.nn.Parameter]:
    """fp32 and bf16 parameters whose sizes are multiples of align_numel: no padding."""
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(4, 8)),
        torch.nn.Parameter(torch.randn(16)),
        torch.nn.Parameter(torch.randn(16, dtype=torch.bfloat16)),
    ]


@pytest.mark.parametrize(
    "cls, slots", [(ShardedAdagrad, ["accumulator"]), (ShardedFtrl, ["accumulator", "linear"])]
)
def test_the_memory_report_counts_every_slot_of_the_rule(cls, slots):
    params = unpadded_params()
    opt = cls(params, use_ema=True, jit_compile=False)
    assert all(b.layout.padding() == () for b in opt.buffers)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    # The state in float32, the compute dtype, for every parameter; a master for bf16 ones.
    per_slot = sum(np.zeros(tuple(p.shape), np.float32).nbytes for p in params)
    master = sum(
        np.zeros(tuple(p.shape), np.float32).nbytes for p in params if p.dtype == torch.bfloat16
    )
    report = opt.memory_report()
    assert sorted(opt.shard_states[0].slots) == sorted(slots)
    assert report["slots"] == len(slots) * per_slot
    assert report["optimizer_state"] == len(slots) * per_slot + per_slot + master
    assert report["moments"] == report["amsgrad_max"] == 0  # Adam's own slots: none here


def test_the_memory_report_counts_adafactors_rows_and_columns():
    """velocity for every element, plus r (4) and c (8) of the one 4 x 8 matrix, in float32."""
    params = unpadded_params()
    opt = ShardedAdafactor(params, jit_compile=False)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    per_slot = sum(np.zeros(tuple(p.shape), np.float32).nbytes for p in params)
    assert opt.memory_report()["slots"] == per_slot + (4 + 8) * 4


def test_the_memory_report_keeps_adams_keys():
    params = unpadded_params()
    opt = ShardedAdam(params, amsgrad=True, use_ema=True, jit_compile=False)
    per_slot = sum(np.zeros(tuple(p.shape), np.float32).nbytes for p in params)
    report = opt.memory_report()
    assert report["moments"] == 2 * per_slot
    assert report["amsgrad_max"] == per_slot
    assert report["slots"] == report["moments"] + report["amsgrad_max"]
    parts = ("moments", "amsgrad_max", "ema", "master_weights")
    assert report["optimizer_state"] == sum(report[k] for k in parts)
