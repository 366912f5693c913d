"""The training app's resume rule (Note [the resume rule] in shardadam/resume.py), frozen
parameters and rank 0's buffers, run in this process (one rank) or launched (branches)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardadam import checkpoint, train
from shardadam.app_config import OptimizerConfig, TrainConfig, TrainerConfig
from shardadam.bootstrap import DistributedContext

REPO = Path(__file__).resolve().parents[2]
ONE_RANK = DistributedContext(0, 1, 0, torch.device("cpu"))
MODELS = "tests.integration.training_models"


def _config(resume=None, steps=8, model="shardadam.models.MLPClassifier", **optimizer):
    return TrainConfig(
        model={"_target_": model, "in_features": 16, "hidden": 16, "classes": 4, "depth": 1},
        data={"_target_": "shardadam.datasets.teacher_classification", "n_train": 256,
              "n_eval": 64},
        optimizer=OptimizerConfig(jit_compile=False, **optimizer),
        trainer=TrainerConfig(
            steps=steps, batch_size=16, eval_every=0, eval_samples=64, checkpoint_every=4,
            keep_last=None, progress=False, plot=False, resume=resume,
        ),
    )  # fmt: skip


def _train(config: TrainConfig, run_dir: Path, caplog, capsys) -> tuple[float, str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with caplog.at_level(logging.INFO):
        loss = train._Run(config, run_dir, ONE_RANK).train()
    return loss, capsys.readouterr().out + caplog.text


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines) if "loss" in m}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """8 steps at learning rate 0.01, checkpoints at steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("first")
    train._Run(_config(learning_rate=0.01), run_dir, ONE_RANK).train()
    return run_dir


def test_the_configs_settings_win_and_every_difference_is_reported(
    first_run, tmp_path, caplog, capsys
):
    source = first_run / "checkpoints" / "step-00000004"
    config = _config(
        resume=str(source), learning_rate=0.002, beta_1=0.5, weight_decay=0.1,
        exclude_from_weight_decay=["bias"],
    )  # fmt: skip
    _, out = _train(config, tmp_path / "resumed", caplog, capsys)
    steps = _metrics(tmp_path / "resumed")
    assert sorted(steps) == [5, 6, 7, 8]
    assert all(m["lr"] == 0.002 for m in steps.values())  # not the checkpoint's 0.01
    manifest = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000008" /
                           "manifest.json").read_text())  # fmt: skip
    group = manifest["body"]["optimizer"]["param_groups"][0]
    assert group["betas"] == [0.5, 0.999] and group["weight_decay"] == 0.1
    assert manifest["body"]["optimizer"]["state"]["iterations"] == 8  # the state: continued
    assert manifest["body"]["optimizer"]["state"]["weight_decay_patterns"] == ["bias"]
    record = json.loads((tmp_path / "resumed" / "resumed.json").read_text())
    assert record["step"] == 4 and record["checkpoint"] == str(source)
    assert record["changed"] == {
        "optimizer.learning_rate": [0.01, 0.002],
        "optimizer.beta_1": [0.9, 0.5],
        "optimizer.weight_decay": [None, 0.1],
        "optimizer.exclude_from_weight_decay": [[], ["bias"]],
    }
    assert "optimizer.learning_rate: 0.002 (the checkpoint's: 0.01)" in out


def test_a_resume_with_the_same_settings_matches_the_uninterrupted_run(
    first_run, tmp_path, caplog, capsys
):
    source = first_run / "checkpoints" / "step-00000004"
    loss, _ = _train(_config(resume=str(source), learning_rate=0.01), tmp_path / "r", caplog,
                     capsys)  # fmt: skip
    whole, resumed = _metrics(first_run), _metrics(tmp_path / "r")
    assert [resumed[s]["loss"] for s in (5, 8)] == [whole[s]["loss"] for s in (5, 8)]
    assert json.loads((tmp_path / "r" / "resumed.json").read_text())["changed"] == {}


def test_a_resumed_run_writes_its_own_directory_and_keeps_the_sources(first_run, tmp_path):
    before = checkpoint.published(first_run / "checkpoints")
    config = _config(resume=str(first_run / "checkpoints"), steps=12, learning_rate=0.01)
    config.trainer.keep_last = 1
    (tmp_path / "next").mkdir()
    train._Run(config, tmp_path / "next", ONE_RANK).train()
    assert checkpoint.published(first_run / "checkpoints") == before  # keep_last spared them
    assert [s for s, _ in checkpoint.published(tmp_path / "next" / "checkpoints")] == [12]
    assert sorted(_metrics(tmp_path / "next")) == [9, 10, 11, 12]  # from the latest, step 8


def test_resume_auto_starts_afresh_then_continues_then_says_it_is_done(tmp_path, caplog, capsys):
    run_dir = tmp_path / "requeued"
    _, out = _train(_config(resume="auto", steps=4), run_dir, caplog, capsys)
    assert "no checkpoint in" in out and sorted(_metrics(run_dir)) == [1, 2, 3, 4]
    _, out = _train(_config(resume="auto", steps=6), run_dir, caplog, capsys)
    assert "resumed from" in out and "at step 4" in out
    _, out = _train(_config(resume="auto", steps=6), run_dir, caplog, capsys)
    assert "the checkpoint is at step 6, trainer.steps=6: nothing left to train" in out
    assert [s for s, _ in checkpoint.published(run_dir / "checkpoints")] == [4, 6]


@pytest.mark.parametrize(
    "resume, overrides, error, message",
    [
        ("missing", {}, FileNotFoundError, "Invalid trainer.resume: no checkpoint at .*missing"),
        ("empty", {}, FileNotFoundError, r"no checkpoint in .*empty.*trainer.resume=auto"),
        ("step-8", {"steps": 8}, ValueError, r"Invalid trainer.steps: 8, but the checkpoint"),
        ("step-4", {"amsgrad": True}, ValueError,
         r"Invalid optimizer.amsgrad: True on resume, but the checkpoint was trained with "
         r"False.*set optimizer.amsgrad=false"),
        ("step-4", {"use_ema": True}, ValueError, r"Invalid optimizer.use_ema: True on resume"),
    ],
)  # fmt: skip
def test_a_resume_that_cannot_be_what_was_asked_fails_before_training(
    first_run, tmp_path, resume, overrides, error, message
):
    (tmp_path / "empty").mkdir()
    where = {
        "missing": tmp_path / "missing",
        "empty": tmp_path / "empty",
        "step-8": first_run / "checkpoints" / "step-00000008",
        "step-4": first_run / "checkpoints" / "step-00000004",
    }[resume]
    steps = overrides.pop("steps", 8)
    config = _config(resume=str(where), steps=steps, learning_rate=0.01, **overrides)
    (tmp_path / "run").mkdir()
    with pytest.raises(error, match=message):
        train._Run(config, tmp_path / "run", ONE_RANK).train()
    assert not (tmp_path / "run" / "checkpoints").exists() or not checkpoint.published(
        tmp_path / "run" / "checkpoints"
    )


def test_frozen_parameters_get_no_optimizer_state_and_are_saved(tmp_path):
    (tmp_path / "f").mkdir()
    frozen = train._Run(_config(model=f"{MODELS}.FrozenBackboneMLP"), tmp_path / "f", ONE_RANK)
    trained = [p for g in frozen.optimizer.param_groups for p in g["params"]]
    assert trained == list(frozen.model.head.parameters())
    head_only = torch.nn.Linear(16, 4)
    from shardadam import ShardedAdam

    reference = ShardedAdam(head_only.parameters(), jit_compile=False)
    assert frozen.optimizer.memory_report() == reference.memory_report()
    backbone = [p.detach().clone() for p in frozen.model.backbone.parameters()]
    frozen.train()
    after = list(frozen.model.backbone.parameters())
    assert all(torch.equal(a, b) for a, b in zip(after, backbone, strict=True))
    saved = json.loads((checkpoint.latest(tmp_path / "f" / "checkpoints") /
                        "manifest.json").read_text())["body"]["tensors"]  # fmt: skip
    assert "model/backbone.layers.0.weight" in saved


def test_branches_from_one_checkpoint_do_not_collide(first_run, tmp_path):
    """Two multirun jobs resumed from one checkpoint: each trains its own steps 5-8 at its own
    learning rate and writes its own checkpoints (they overwrote each other before)."""
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, "-m", "shardadam.train", "--multirun",
         "model=mlp_classifier", "data=teacher_classification", "model.hidden=16",
         "model.depth=1", "data.n_train=256", "data.n_eval=64", "~optimizer/schedule",
         "optimizer.jit_compile=false", "optimizer.use_ema=false", "optimizer.weight_decay=null",
         "optimizer.global_clipnorm=null", "optimizer.beta_2=0.999",
         "optimizer.exclude_from_weight_decay=[]", "optimizer.learning_rate=0.02,0.03",
         "trainer.steps=8", "trainer.batch_size=16", "trainer.eval_samples=64",
         "trainer.progress=false", "trainer.plot=false",
         f"trainer.resume={first_run / 'checkpoints' / 'step-00000004'}",
         f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    branches = [_metrics(sweep / job) for job in ("0", "1")]
    for steps, rate in zip(branches, (0.02, 0.03), strict=True):
        assert sorted(steps) == [5, 6, 7, 8] and {m["lr"] for m in steps.values()} == {rate}
    assert branches[0][8]["loss"] != branches[1][8]["loss"]
    for job in ("0", "1"):
        assert [s for s, _ in checkpoint.published(sweep / job / "checkpoints")] == [8]
    assert [s for s, _ in checkpoint.published(first_run / "checkpoints")] == [4, 8]


def test_a_resume_restores_every_random_generator_the_checkpoint_saved(first_run, tmp_path):
    import random

    import numpy

    source = first_run / "checkpoints" / "step-00000004"
    saved = checkpoint.read_extra(source)["rng"]
    assert set(saved) == {"torch", "numpy", "python"}  # CUDA's too where the device is a GPU
    random.seed(123)
    numpy.random.seed(123)
    torch.manual_seed(123)
    (tmp_path / "run").mkdir()
    run = train._Run(_config(resume=str(source), learning_rate=0.01), tmp_path / "run", ONE_RANK)
    assert run._resume() == 4
    assert random.getstate() == saved["python"]
    state, expected = numpy.random.get_state(), saved["numpy"]
    assert state[0] == expected[0] and numpy.array_equal(state[1], expected[1])
    assert state[2:] == expected[2:]
    assert torch.equal(torch.get_rng_state(), saved["torch"])


def test_a_checkpoint_saved_outside_the_app_resumes_with_the_configs_settings(
    tmp_path, caplog, capsys
):
    """No recorded config, no RNG states (a user's own `checkpoint.save`): the app says so and
    trains on from the saved step with its config's settings."""
    (tmp_path / "own").mkdir()
    own = train._Run(_config(learning_rate=0.01), tmp_path / "own", ONE_RANK)
    checkpoint.save(tmp_path / "saved", model=own.model, optimizer=own.optimizer, step=3)
    _, out = _train(_config(resume=str(tmp_path / "saved"), steps=5), tmp_path / "r", caplog,
                    capsys)  # fmt: skip
    assert "the checkpoint records no config: settings are the config's" in out
    assert "holds no RNG states: drawing on from trainer.seed" in out
    assert sorted(_metrics(tmp_path / "r")) == [4, 5]
    assert {m["lr"] for m in _metrics(tmp_path / "r").values()} == {0.001}


def test_evaluations_and_saved_weights_are_rank_0s_model_on_two_ranks(tmp_path):
    """BatchNorm's running statistics differ between ranks after training on their own
    batches; rank 0's are broadcast before evaluating and saving, so the held-out loss the app
    reports is the loss of the saved model evaluated in one process."""
    from tests.integration.test_train_app import metrics, run_app
    from tests.integration.training_models import BatchNormMLP

    done, out = run_app(
        "model=mlp_classifier", "data=teacher_classification", "data.n_eval=64",
        f"model._target_={MODELS}.BatchNormMLP", "optimizer.use_ema=false", "trainer.steps=6",
        "trainer.eval_samples=64", f"hydra.run.dir={tmp_path}",
        launcher=[str(REPO / "launch" / "torchrun.sh")], env={"PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, out
    reported = [m["eval_loss_weights"] for m in metrics(tmp_path) if "eval_loss_weights" in m]
    model = BatchNormMLP(16, 64, 4, 2)
    model.load_state_dict(checkpoint.read_weights(tmp_path / "checkpoints"), strict=True)
    assert int(model.norm.num_batches_tracked) == 6
    from shardadam.datasets import teacher_classification

    inputs, labels = teacher_classification(n_eval=64).eval.tensors
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model.eval()(inputs), labels).item()
    assert reported[-1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_generator_is_saved_and_restored():
    from shardadam.resume import restore_rng_states, rng_states

    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.manual_seed(7)
    states = rng_states(device)
    expected = torch.rand(4, device=device)
    torch.cuda.manual_seed(8)
    assert restore_rng_states({"rng": states}, device)
    assert torch.equal(torch.rand(4, device=device), expected)
