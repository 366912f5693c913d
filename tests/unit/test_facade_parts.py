"""What the facade's parts add: the rule's name in the state dict, checked on every load."""

from __future__ import annotations

import re

import pytest
import torch

from shardadam import checkpoint
from shardadam.optimizers import FAMILY, ShardedAdam, ShardedAdamW, ShardedSGD

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
