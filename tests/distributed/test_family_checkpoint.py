"""A checkpoint of every member of the family, saved at world size 2 in the middle of training
(with the EMA, weight decay and its own arguments), loads at world sizes 1 and 3 and continues
as the uninterrupted run, within float rounding (the averaged gradient is the same at every
world size up to the order of additions).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.distributed import checkpoint_cases as cases
from tests.distributed.spawn import run_ranks
from tests.unit.test_family_keras import MEMBERS, OWN_ARGUMENTS

SAVED_AT, MORE_STEPS = 3, 3
RTOL, ATOL = 1e-5, 1e-7
"""Float rounding: at another world size the averaged gradient is summed in another order,
which a rule dividing by sqrt(v) (RMSprop) amplifies to relative differences near 1e-6."""
TIMEOUT_S = 30


def make(member: str):
    model = cases.Model()
    opt = MEMBERS[member](
        model.named_parameters(),
        learning_rate=0.05,
        weight_decay=0.1,
        use_ema=True,
        jit_compile=False,
        bucket_cap_mb=0.0005,
        **OWN_ARGUMENTS.get(member, {}),
    )
    return model, opt


def save_then_continue(rank: int, world_size: int, root: str) -> dict:
    from shardadam import checkpoint

    finals = {}
    for member in sorted(MEMBERS):
        model, opt = make(member)
        cases.train(model, opt, rank, world_size, 0, SAVED_AT)
        checkpoint.save(Path(root) / member, model=model, optimizer=opt, step=SAVED_AT)
        cases.train(model, opt, rank, world_size, SAVED_AT, MORE_STEPS)
        finals[member] = cases.snapshot(model, opt)
    return finals


def load_then_continue(rank: int, world_size: int, root: str) -> dict:
    from shardadam import checkpoint

    finals = {}
    for member in sorted(MEMBERS):
        model, opt = make(member)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.add_(1.0)  # anything but the saved values
        checkpoint.load(Path(root) / member, model=model, optimizer=opt)
        cases.train(model, opt, rank, world_size, SAVED_AT, MORE_STEPS)
        finals[member] = cases.snapshot(model, opt)
    return finals


@functools.cache
def results(root: Path) -> dict:
    uninterrupted = run_ranks(2, save_then_continue, str(root), timeout_s=TIMEOUT_S)[0]
    resumed = {
        "W=1": load_then_continue(0, 1, str(root)),
        "W=3": run_ranks(3, load_then_continue, str(root), timeout_s=TIMEOUT_S)[0],
    }
    return {"uninterrupted": uninterrupted, "resumed": resumed}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("family_checkpoints")


@pytest.mark.parametrize("resumed", ["W=1", "W=3"])
@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_member_resumes_at_another_world_size(root, member, resumed):
    got = results(root)["resumed"][resumed][member]
    want = results(root)["uninterrupted"][member]
    assert got["iterations"] == want["iterations"] == SAVED_AT + MORE_STEPS
    for key, value in want["model"].items():
        torch.testing.assert_close(
            got["model"][key], value, rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}"
        )
    assert got["optimizer"].keys() == want["optimizer"].keys()
    for i, entry in want["optimizer"].items():
        assert got["optimizer"][i].keys() == entry.keys(), f"{member} parameter {i}"
        for key, value in entry.items():
            torch.testing.assert_close(
                got["optimizer"][i][key],
                value,
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, k=f"{i} {key}": f"{k}: {m}",
            )
