"""Re-saving a step that exists, stopped before each of its file-system operations in turn
(Note [crash points] in shardadam.checkpoint.fs). After every stop, ``latest`` finds a complete
copy of the step, old or new, and the next save recovers: no checkpoint lost, nothing left over.

A crash is ``os._exit`` in a forked child (no cleanup runs, unflushed buffers are lost); a
failure is an exception in this process (the save's own cleanup runs). A process crash leaves
the page cache to the kernel, so fsync changes nothing here: it is still an operation to stop
before, but skipped, which makes each save several times faster.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from shardadam import checkpoint
from shardadam.checkpoint import fs
from tests.unit.test_checkpoint import make as make_amsgrad_ema
from tests.unit.test_checkpoint import state_of, train

STEPS = [10, 20]  # the root holds both; every save here re-saves step 20 with keep_last=2
SETTLED = frozenset(f"step-{step:08d}" for step in STEPS)
RESAVED = 20
CRASHED = 70  # a child's exit status when it stopped where it was told to
Save = Callable[[Path], object]


class _Stop(Exception):
    """The simulated failure of one file-system operation."""


def make():
    return make_amsgrad_ema(amsgrad=False, use_ema=False)  # fewer records: fewer operations


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A root with steps 10 and 20 (the "old" state), and two later states to re-save as 20."""
    template = tmp_path_factory.mktemp("template")
    model, opt = make()
    train(model, opt, 0, 1)
    checkpoint.save(template, model=model, optimizer=opt, step=10)
    states, savers = {}, {}
    for count, name in enumerate(["old", "new", "after"], start=2):
        model, opt = make()
        train(model, opt, 0, count)
        states[name] = state_of(model, opt)
        savers[name] = _saver(model, opt)
    savers["old"](template)
    loader = make()  # a load overwrites all the state compared, so one pair serves every load
    return {"template": template, "states": states, "savers": savers, "loader": loader}


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda descriptor: None)


def _saver(model, opt) -> Save:
    return lambda root: checkpoint.save(root, model=model, optimizer=opt, step=RESAVED, keep_last=2)


def _operations(root: Path, save: Save, scratch: Path) -> list[str]:
    """The file-system operations ``save`` makes on (a copy of) ``root``, in order."""
    shutil.copytree(root, scratch)
    seen = []
    fs.before_operation = lambda operation, path: seen.append(
        f"{operation} {os.path.relpath(path, scratch)}"
    )
    try:
        save(scratch)
    finally:
        fs.before_operation = None
    return seen


def _stop_before(k: int, root: Path, save: Save, crash: bool) -> None:
    """Run ``save(root)`` until just before its k-th file-system operation, then crash (in a
    forked child) or raise there."""
    count = 0

    def stop(operation: str, path: Path) -> None:
        nonlocal count
        count += 1
        if count == k:
            if crash:
                os._exit(CRASHED)
            raise _Stop(f"{operation} {path}")

    if not crash:
        fs.before_operation = stop
        try:
            with pytest.raises(_Stop):
                save(root)
        finally:
            fs.before_operation = None
        return
    pid = os.fork()
    if pid == 0:  # the child: save, and never return into pytest
        try:
            fs.before_operation = stop
            save(root)
        except BaseException:
            traceback.print_exc()
        os._exit(1)
    deadline = time.monotonic() + 30
    while not (waited := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the save to be stopped before operation {k} hung")
        time.sleep(0.001)
    assert os.waitstatus_to_exitcode(waited[1]) == CRASHED, f"operation {k} was not reached"


def _loaded(root: Path, loader: tuple) -> dict:
    model, opt = loader
    checkpoint.load(root, model=model, optimizer=opt)
    return state_of(model, opt)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _assert_a_copy_loads(root: Path, expected: list[dict], loader: tuple, where: str) -> None:
    found = checkpoint.published(root)
    assert [step for step, _ in found] == STEPS, f"{where}: published {found}"
    assert checkpoint.latest(root) == found[-1][1], where
    got = _loaded(root, loader)
    assert any(_same(got, state) for state in expected), f"{where}: loaded another state"


def _assert_next_save_recovers(root: Path, runs: dict, where: str) -> None:
    runs["savers"]["after"](root)
    names = sorted(entry.name for entry in root.iterdir())
    assert names == sorted(SETTLED), f"{where}, then a save: left {names}"
    assert _same(_loaded(root, runs["loader"]), runs["states"]["after"]), where


def _stop_at_each_operation(
    root: Path, save: Save, expected: list[dict], runs: dict, scratch: Path, crash: bool
) -> list[tuple[Path, str]]:
    """Stop ``save`` on a copy of ``root`` before each of its operations in turn; check that a
    copy loads after each, and return what each stop left (and where it stopped)."""
    operations = _operations(root, save, scratch / "dry-run")
    assert len(operations) > 10, operations
    left = []
    for k, operation in enumerate(operations, start=1):
        stopped = scratch / f"stopped-before-{k}"
        shutil.copytree(root, stopped)
        _stop_before(k, stopped, save, crash)
        where = f"stopped before operation #{k} ({operation})"
        _assert_a_copy_loads(stopped, expected, runs["loader"], where)
        left.append((stopped, where))
    return left


def _visible(root: Path) -> frozenset[str]:
    return frozenset(entry.name for entry in root.iterdir() if not entry.name.startswith("."))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_crash_anywhere_in_a_resave_leaves_a_copy_and_the_next_save_recovers(runs, tmp_path):
    old, new = runs["states"]["old"], runs["states"]["new"]
    left = _stop_at_each_operation(
        runs["template"], runs["savers"]["new"], [old, new], runs, tmp_path, crash=True
    )
    by_state = {_visible(stopped): stopped for stopped, _ in left}
    assert by_state.keys() == {
        SETTLED,
        SETTLED | {"step-00000020.new"},  # the new copy complete, the old one still there
        SETTLED - {"step-00000020"} | {"step-00000020.new"},  # the old one moved aside
    }
    for state, stopped in by_state.items():  # the step's own path loads too, in every state
        got = _loaded(checkpoint.checkpoint_path(stopped, RESAVED), runs["loader"])
        assert _same(got, old) or _same(got, new), sorted(state)
    for stopped, where in left:
        _assert_next_save_recovers(stopped, runs, where)


def test_a_failure_anywhere_in_a_resave_or_in_the_save_that_recovers_it(runs, tmp_path):
    """Also stops the save that finishes an interrupted swap before each of its operations."""
    old, new, after = (runs["states"][name] for name in ("old", "new", "after"))
    left = _stop_at_each_operation(
        runs["template"], runs["savers"]["new"], [old, new], runs, tmp_path / "first", False
    )
    mid_swap = {_visible(stopped): stopped for stopped, _ in left if _visible(stopped) != SETTLED}
    assert len(mid_swap) == 2, mid_swap
    for i, stopped in enumerate(mid_swap.values()):
        again = _stop_at_each_operation(
            stopped, runs["savers"]["after"], [old, new, after], runs, tmp_path / f"{i}", False
        )
        for twice, where in again:
            _assert_next_save_recovers(twice, runs, f"{where} of the save that recovers")
    for stopped, where in left:
        _assert_next_save_recovers(stopped, runs, where)
