"""The app's start-up choices on 2 gloo ranks: rank 0 decides, every rank follows or raises.

Each rank works in its own directory, so a relative path names different files on each rank:
that stands in for a checkpoint directory on a node-local disk (Note [rank 0 decides] in
shardadam/startup.py). All cases run in one spawned group; its timeout is short, so a rank left
waiting in a collective fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardadam import model_sync, startup, train
from shardadam.app_config import OptimizerConfig, TrainConfig, TrainerConfig
from shardadam.bootstrap import DistributedContext

WORLD_SIZE = 2
TIMEOUT_S = 20  # the process group's: a mismatched collective fails within this
DEADLINE_S = 120  # the whole group's, should a rank hang outside a collective


def _fake_checkpoint(root: Path, step: int) -> Path:
    """What ``checkpoint.published`` looks for: ``step-<N>/manifest.json``."""
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    return path


def _config(checkpoint_dir: str, resume: bool) -> TrainConfig:
    """``resume``: continue from ``checkpoint_dir`` if it holds a checkpoint."""
    return TrainConfig(
        model={"_target_": "shardadam.models.MLPClassifier", "hidden": 8, "depth": 1},
        data={"_target_": "shardadam.datasets.teacher_classification", "n_train": 64,
              "n_eval": 16},
        optimizer=OptimizerConfig(jit_compile=False),
        trainer=TrainerConfig(
            steps=4, batch_size=8, eval_samples=16, progress=False, plot=False,
            resume="auto" if resume else None, checkpoint_dir=checkpoint_dir,
        ),
    )  # fmt: skip


def _app_resumes_from_a_shared_checkpoint(ctx: DistributedContext, shared: Path) -> tuple:
    saving = train._Run(_config(str(shared / "app"), resume=False), Path("."), ctx)
    with torch.no_grad():
        for param in saving.model.parameters():
            param.add_(0.5)  # so that resuming visibly loads the weights
    saving._save(2)
    resumed = train._Run(_config(str(shared / "app"), resume=True), Path("."), ctx)
    step = resumed._resume()
    saved, loaded = ([p.detach().clone() for p in r.model.parameters()] for r in (saving, resumed))
    return step, saved, loaded


def _buffers_after_broadcast(ctx: DistributedContext) -> tuple:
    """A BatchNorm that saw different batches on each rank, before and after the broadcast."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(8, 3, generator=torch.Generator().manual_seed(ctx.rank)) + ctx.rank)
    before = [b.clone() for b in model.buffers()]
    model_sync.broadcast_buffers(model, ctx)
    return before, [b.clone() for b in model.buffers()]


def _cases(rank: int, root: Path) -> dict[str, tuple]:
    ctx = DistributedContext(rank, WORLD_SIZE, 0, torch.device("cpu"))
    shared = root / "shared"
    cases = {
        "both see": lambda: startup.decide_resume(shared / "both", ctx),
        "none": lambda: startup.decide_resume(shared / "none", ctx),
        "no directory": lambda: startup.decide_resume(shared / "missing", ctx),
        "rank 0 only": lambda: startup.decide_resume(Path("local"), ctx),
        "rank 1 only": lambda: startup.decide_resume(Path("stale"), ctx),
        "required, none": lambda: startup.decide_resume(shared / "none", ctx, required=True),
        "buffers": lambda: _buffers_after_broadcast(ctx),
        "run dir shared": lambda: startup.shared_output_dir(shared / f"out{rank}", ctx, "ckpt"),
        "run dir not shared": lambda: startup.shared_output_dir(Path("out"), ctx, "ckpt"),
        "app shared": lambda: _app_resumes_from_a_shared_checkpoint(ctx, shared),
        # Last: before the fix, rank 1 started afresh here while rank 0 loaded.
        "app rank 0 only": lambda: train._Run(_config("app_local", True), Path("."), ctx)._resume(),
    }
    results = {}
    for name, case in cases.items():
        try:
            results[name] = ("ok", case())
        except Exception as error:
            results[name] = ("error", type(error).__name__, str(error))
    return results


def _worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    root = Path(root)
    os.chdir(root / f"rank{rank}")  # relative paths: this rank's own files
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(str(root / "store"), WORLD_SIZE),
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        torch.save(_cases(rank, root), root / f"results{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, tuple]]:
    root = tmp_path_factory.mktemp("resume")
    shared = root / "shared"
    _fake_checkpoint(shared / "both", 4)
    _fake_checkpoint(shared / "both", 8)
    (shared / "none").mkdir()
    _fake_checkpoint(root / "rank0" / "local", 8)
    (root / "rank1" / "local").mkdir(parents=True)
    (root / "rank0" / "stale").mkdir(parents=True)
    _fake_checkpoint(root / "rank1" / "stale", 3)
    _fake_checkpoint(root / "rank0" / "app_local", 2)
    # Forked, the ranks start with the modules this process has imported (seconds each).
    context = mp.start_processes(
        _worker, args=(str(root),), nprocs=WORLD_SIZE, join=False, start_method="fork"
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {DEADLINE_S} s")
    return [torch.load(root / f"results{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def _same_on_every_rank(results: list[dict[str, tuple]], case: str) -> tuple:
    outcomes = [r[case] for r in results]
    assert all(o == outcomes[0] for o in outcomes), outcomes
    return outcomes[0]


def _same_error_on_every_rank(results: list[dict[str, tuple]], case: str) -> str:
    outcome = _same_on_every_rank(results, case)
    assert outcome[:2] == ("error", "RuntimeError"), outcome
    return outcome[2]


def test_a_checkpoint_every_rank_sees_is_the_one_every_rank_resumes_from(results):
    outcome = _same_on_every_rank(results, "both see")
    assert outcome[0] == "ok" and outcome[1].name == "step-00000008", outcome


@pytest.mark.parametrize("case", ["none", "no directory", "rank 1 only"])
def test_every_rank_starts_afresh_where_rank_0_finds_no_checkpoint(results, case):
    assert _same_on_every_rank(results, case) == ("ok", None)


def test_a_checkpoint_rank_0_alone_sees_is_the_same_error_on_every_rank(results):
    message = _same_error_on_every_rank(results, "rank 0 only")
    assert "rank 1/2 cannot read local/step-00000008/manifest.json" in message
    assert "rank 0 chose to resume from" in message and "rank 0/2 cannot" not in message
    assert "must be on a file system that every rank shares" in message


def test_every_rank_takes_rank_0s_run_dir_and_sees_its_checkpoint_dir(results):
    kind, output_dir = _same_on_every_rank(results, "run dir shared")
    assert kind == "ok" and output_dir.name == "out0", output_dir
    assert not list(output_dir.glob("ckpt/.shared-probe-*"))  # rank 0 removed its probe


def test_a_checkpoint_dir_that_is_not_shared_fails_on_every_rank_at_start(results):
    message = _same_error_on_every_rank(results, "run dir not shared")
    assert "rank 1/2 cannot read out/ckpt/.shared-probe-" in message
    assert "must be on a file system that every rank shares" in message


def test_the_app_resumes_every_rank_from_the_same_step(results):
    for kind, result in (r["app shared"] for r in results):
        assert kind == "ok", result
        step, saved, loaded = result
        assert step == 2
        assert all(torch.equal(s, t) for s, t in zip(saved, loaded, strict=True))


def test_the_app_refuses_on_every_rank_a_checkpoint_rank_0_alone_sees(results):
    message = _same_error_on_every_rank(results, "app rank 0 only")
    assert "rank 1/2 cannot read app_local/step-00000002/manifest.json" in message


def test_a_required_checkpoint_that_is_not_there_is_the_same_error_on_every_rank(results):
    outcomes = [r["required, none"] for r in results]
    assert all(o == outcomes[0] for o in outcomes) and outcomes[0][1] == "FileNotFoundError"
    assert "Invalid trainer.resume: no checkpoint in" in outcomes[0][2]
    assert "trainer.resume=auto to continue" in outcomes[0][2]


def test_broadcast_buffers_gives_every_rank_rank_0s_buffers(results):
    (kind0, (before0, after0)), (kind1, (before1, after1)) = (r["buffers"] for r in results)
    assert kind0 == kind1 == "ok"
    assert not torch.equal(before0[0], before1[0])  # running means from different batches
    for ours, theirs, rank0 in zip(after1, after0, before0, strict=True):
        assert torch.equal(ours, rank0) and torch.equal(theirs, rank0)
    assert int(after1[2]) == 1  # num_batches_tracked (int64) too
