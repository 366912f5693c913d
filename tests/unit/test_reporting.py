"""shardadam.reporting in one process: what rank 0 writes (metrics.jsonl, TensorBoard), how a
resume into the same run directory keeps each step once, and where messages go."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from shardadam import ShardedAdam
from shardadam.app_config import TrainConfig, TrainerConfig
from shardadam.bootstrap import DistributedContext
from shardadam.reporting import LOGGER, Reporter, keep_records_before

CPU = torch.device("cpu")
MAIN = DistributedContext(rank=0, world_size=1, local_rank=0, device=CPU)
HYDRA_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@pytest.fixture(autouse=True)
def restore_logging():
    """The tests change the root logger's handlers (as Hydra does) and LOGGER's: put them back."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, LOGGER.handlers[:], LOGGER.level, LOGGER.propagate)
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers, root.level = saved[0], saved[1]
    LOGGER.handlers, LOGGER.level, LOGGER.propagate = saved[2], saved[3], saved[4]


def make_reporter(run_dir: Path, ctx: DistributedContext = MAIN, **trainer) -> Reporter:
    settings = {"progress": False, "plot": False, "steps": 20, **trainer}
    config = TrainConfig(
        model={"_target_": "unused"}, data={"_target_": "unused"}, trainer=TrainerConfig(**settings)
    )
    return Reporter(config, run_dir, ctx, items_per_sample=1)


def make_model() -> tuple[torch.nn.Module, ShardedAdam]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # 12 frozen
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return model, ShardedAdam(trainable, learning_rate=0.01, jit_compile=False)


def run(reporter: Reporter, start: int, steps: range, evals: dict[int, float], tag: float):
    """Drive a reporter as the app does: the evaluation at ``start``, then ``steps`` with the
    evaluations of ``evals`` after theirs; step s's training loss is ``tag + s``."""
    model, optimizer = make_model()
    reporter.start(start, model, optimizer)
    reporter.evaluated(start, {"weights": evals.get(start, tag)}, first=True)
    for step in steps:
        reporter.stepped(step, tag + step, optimizer, seconds=0.01)
        if step in evals:
            reporter.evaluated(step, {"weights": evals[step]})


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [(e.step, round(e.value, 4)) for e in events.Scalars(tag)]


def test_tensorboard_has_every_evaluation_and_training_scalars_every_log_every(tmp_path):
    reporter = make_reporter(tmp_path, tensorboard=True, log_every=5)
    run(reporter, 0, range(1, 8), evals={0: 2.5, 3: 1.5, 7: 0.5}, tag=10.0)
    reporter.finish()
    assert scalars(tmp_path, "eval_loss_weights") == [(0, 2.5), (3, 1.5), (7, 0.5)]
    assert scalars(tmp_path, "loss") == [(5, 15.0)]
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == list(range(1, 8))


def test_a_resume_into_the_same_directory_keeps_each_step_once(tmp_path):
    # The first job: checkpoint at 4 (evaluated there), killed after logging steps 5 and 6,
    # in the middle of writing a line.
    first = make_reporter(tmp_path, tensorboard=True, log_every=1)
    run(first, 0, range(1, 7), evals={0: 3.0, 4: 2.0}, tag=100.0)
    first.metrics.write('{"step": 7, "lo')
    first.finish()
    # The requeued job resumes from step 4 and trains to 8.
    second = make_reporter(tmp_path, tensorboard=True, log_every=1, plot=True)
    run(second, 4, range(5, 9), evals={4: 2.0, 8: 1.0}, tag=200.0)
    second.finish()

    records = read_metrics(tmp_path)
    training = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert training == [(s, 100.0 + s) for s in range(1, 5)] + [(s, 200.0 + s) for s in range(5, 9)]
    evaluations = [(r["step"], r["eval_loss_weights"]) for r in records if "loss" not in r]
    assert evaluations == [(0, 3.0), (4, 2.0), (8, 1.0)]
    assert second.history == records  # what loss.png shows
    assert (tmp_path / "loss.png").exists()
    files = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert files == ["loss.png", "metrics.jsonl"]  # no temporary file left behind
    # TensorBoard agrees: the first job's steps from 4 on are hidden, step 4's loss kept.
    assert scalars(tmp_path, "loss") == training
    assert scalars(tmp_path, "eval_loss_weights") == evaluations


def test_a_run_from_step_0_in_a_used_directory_starts_the_file_afresh(tmp_path):
    run(make_reporter(tmp_path), 0, range(1, 4), evals={3: 1.0}, tag=100.0)
    run(make_reporter(tmp_path), 0, range(1, 3), evals={}, tag=200.0)
    assert [(r["step"], r.get("loss")) for r in read_metrics(tmp_path)] == [
        (0, None), (1, 201.0), (2, 202.0)
    ]  # fmt: skip


def test_a_resume_with_nothing_to_drop_leaves_the_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval_loss_weights": 1.0}\n{"step": 1, "loss": 0.5}\n')
    inode = path.stat().st_ino
    assert keep_records_before(path, 1) == [
        {"step": 0, "eval_loss_weights": 1.0}, {"step": 1, "loss": 0.5}
    ]  # fmt: skip
    assert path.stat().st_ino == inode  # not rewritten
    assert keep_records_before(tmp_path / "missing.jsonl", 5) == []


def test_start_reports_total_and_trainable_parameters(tmp_path, capsys):
    model, optimizer = make_model()
    make_reporter(tmp_path).start(0, model, optimizer)
    assert "ranks: 1; parameters: 26; trainable: 14; optimizer state" in capsys.readouterr().out


@pytest.mark.parametrize("progress", [False, True])
def test_rank_0_messages_reach_the_log_file_once_and_the_console_once(tmp_path, capsys, progress):
    # What Hydra's default job logging sets up: a console and a train.log on the root.
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(), logging.FileHandler(tmp_path / "train.log")):
        handler.setFormatter(logging.Formatter(HYDRA_FORMAT))
        root.addHandler(handler)
    reporter = make_reporter(tmp_path, progress=progress)
    reporter.say("no checkpoint here: starting from step 0")  # before start, as _resume does
    run(reporter, 0, range(1, 4), evals={0: 2.0, 3: 1.0}, tag=10.0)
    reporter.finish()

    messages = [
        "no checkpoint here: starting from step 0",
        "held-out loss before training: 2.0000",
        "held-out loss at step 3: 1.0000",
        f"metrics: {tmp_path / 'metrics.jsonl'}",
    ]
    log = (tmp_path / "train.log").read_text().splitlines()
    out, err = capsys.readouterr()
    for message in messages:
        (line,) = [line for line in log if message in line]
        assert line.endswith(f"][shardadam.train][INFO] - {message}"), log
        assert out.splitlines().count(message) == 1, out  # bare, whole lines, once
        assert message not in err
    assert sum("parameters: 26; trainable: 14" in line for line in out.splitlines()) == 1
    assert "[INFO]" not in out
    if progress:
        assert "3/20" in err and "3/20" not in out  # the bar stays on stderr


def test_other_ranks_write_no_log_file_and_show_warnings_on_stderr(tmp_path, capsys):
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    log_file = logging.FileHandler(tmp_path / "train.log")
    root.addHandler(log_file)
    other = DistributedContext(rank=1, world_size=2, local_rank=1, device=CPU)
    reporter = make_reporter(tmp_path, ctx=other)
    reporter.say("rank 0 says this, not rank 1")
    LOGGER.info("an app message at INFO")
    LOGGER.warning("the disk is almost full")
    logging.getLogger("some.library").info("a library's message")
    log_file.flush()

    assert (tmp_path / "train.log").read_text() == ""
    assert log_file not in root.handlers
    out, err = capsys.readouterr()
    assert "rank 1/2: WARNING: the disk is almost full" in err
    assert "rank 0 says this" not in out + err and "an app message" not in out + err
