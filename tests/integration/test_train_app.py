"""The training app end to end: one process, torchrun, and the errors it must give early."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shardadam import checkpoint

REPO = Path(__file__).resolve().parents[2]
FAST = ["optimizer.jit_compile=false", "trainer.progress=false"]
MLP = ["model=mlp_classifier", "data=teacher_classification"]


def run_app(*overrides: str, launcher: list[str] | None = None, env: dict | None = None):
    command = [*(launcher or [sys.executable, "-m", "shardadam.train"]), *FAST, *overrides]
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, **(env or {})},
    )
    return done, done.stdout + done.stderr


def held_out_losses(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"held-out loss [^:]*: ([0-9.]+)", out)]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_overrides_reach_the_optimizer_and_outputs_land_in_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    done, out = run_app(
        *MLP,
        "trainer.steps=12",
        "trainer.eval_every=6",
        "~optimizer/schedule",  # a constant learning rate
        "optimizer.learning_rate=0.0123",
        "optimizer.beta_1=0.8",
        "optimizer.amsgrad=true",
        "optimizer.use_ema=false",
        f"hydra.run.dir={run_dir}",
    )
    assert done.returncode == 0, out
    manifest = json.loads(
        (checkpoint.latest(run_dir / "checkpoints") / "manifest.json").read_text()
    )
    group = manifest["body"]["optimizer"]["param_groups"][0]
    assert group["lr"] == 0.0123 and group["betas"] == [0.8, 0.99] and group["amsgrad"] is True
    assert any(k.startswith("optimizer/velocity_hat/") for k in manifest["body"]["tensors"])
    assert not any(k.startswith("optimizer/average/") for k in manifest["body"]["tensors"])
    steps = [m for m in metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 13))
    assert all(m["lr"] == 0.0123 for m in steps)
    assert {"grad_norm", "step_time_s", "items_per_s", "optimizer_state_bytes_per_rank"} <= set(
        steps[0]
    )
    assert "learning_rate: 0.0123" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(held_out_losses(out)) == 3  # before, at 6, at 12


def test_another_member_trains_with_its_own_arguments(tmp_path):
    run_dir = tmp_path / "run"
    done, out = run_app(
        *MLP, "optimizer=sgd", "optimizer.momentum=0.9", "optimizer.nesterov=true",
        "~optimizer/schedule", "trainer.steps=6", "trainer.eval_every=0", "trainer.plot=false",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert done.returncode == 0, out
    body = json.loads((checkpoint.latest(run_dir / "checkpoints") / "manifest.json").read_text())
    group = body["body"]["optimizer"]["param_groups"][0]
    assert group["lr"] == 0.01 and group["momentum"] == 0.9 and group["nesterov"] is True
    assert "betas" not in group  # SGD's keys only, with Keras's learning rate
    assert any(k.startswith("optimizer/momentum/") for k in body["body"]["tensors"])
    assert "class_name: SGD" in (run_dir / ".hydra" / "config.yaml").read_text()
    first, last = held_out_losses(out)[0], held_out_losses(out)[-1]
    assert last < first, out


def test_wraps_an_existing_module_given_on_the_command_line(tmp_path):
    done, out = run_app(
        "data=teacher_classification", "~model",
        "+model={_target_:torch.nn.Linear,in_features:16,out_features:4}",
        "trainer.steps=30", f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert done.returncode == 0, out
    assert "parameters: 68;" in out  # 16 * 4 + 4
    first, last = held_out_losses(out)[0], held_out_losses(out)[-1]
    assert last < first, out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["optimizer.learnin_rate=0.1"],
            r"Unknown key optimizer.learnin_rate \(did you mean "
            r"optimizer.learning_rate\?\): optimizer has learning_rate, schedule, weight_decay",
        ),
        (
            ["optimizer=sgd", "optimizer.beta_1=0.9"],  # Adam's argument, not SGD's
            r"Unknown key optimizer.beta_1: optimizer has learning_rate, .*, momentum, nesterov "
            r"\(beta_1 is an argument of Adam, AdamW, .*, not of SGD",
        ),
        # Hydra itself adds a key given with "+", silently: the app must refuse it too.
        (["+optimizer.learing_rate=0.1"], r"Unknown key optimizer.learing_rate \(did you mean"),
        (["+trainer.step=3"], r"Unknown key trainer.step \(did you mean trainer.steps\?\)"),
        (["trainer.steps=ten"], "Value 'ten' of type 'str' could not be converted to Integer"),
        (["~model._target_"], "model._target_ is missing: set it to the import path"),
        (
            ["optimizer.beta_1=1.5"],
            r"Invalid optimizer.beta_1: 1.5 \(expected 0 <= optimizer.beta_1 < 1\)",
        ),
        (["trainer.batch_size=0"], r"Invalid trainer.batch_size: 0 \(expected an integer >= 1\)"),
        (["trainer.batch_size=5000"], "is more than the 4096 samples of the training split"),
        (["hydra.run.dir=README.md/run"], "set hydra.run.dir to a writable directory"),
        (
            ["trainer.checkpoint_dir=/dev/null/checkpoints"],
            "set trainer.checkpoint_dir to a writable directory",
        ),
    ],
)
def test_bad_configs_fail_at_start_saying_what_to_change(tmp_path, overrides, message):
    done, out = run_app(*MLP, f"hydra.run.dir={tmp_path / 'run'}", *overrides)
    assert done.returncode != 0
    assert re.search(message, out), out
    assert "held-out loss" not in out  # nothing trained


def test_multirun_makes_a_run_dir_per_value(tmp_path):
    sweep = tmp_path / "sweep"
    done, out = run_app(
        *MLP, "trainer.steps=4", "optimizer.learning_rate=0.001,0.002", f"hydra.sweep.dir={sweep}",
        launcher=[sys.executable, "-m", "shardadam.train", "--multirun"],
    )  # fmt: skip
    assert done.returncode == 0, out
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    for run_dir, rate in zip(runs, ["0.001", "0.002"]):
        assert f"learning_rate: {rate}" in (run_dir / ".hydra" / "config.yaml").read_text()
        assert len([m for m in metrics(run_dir) if "loss" in m]) == 4


def test_resume_continues_like_the_uninterrupted_run(tmp_path):
    common = [*MLP, "trainer.steps=16", "trainer.checkpoint_every=8", "trainer.keep_last=null"]
    whole = tmp_path / "whole"
    done, out = run_app(*common, f"hydra.run.dir={whole}")
    assert done.returncode == 0, out
    # A run that stopped after step 8: its checkpoint directory holds step 8 only.
    stopped = tmp_path / "stopped"
    shutil.copytree(whole / "checkpoints" / "step-00000008", stopped / "step-00000008")
    resumed = tmp_path / "resumed"
    done, resumed_out = run_app(
        *common, f"trainer.resume={stopped}",
        f"hydra.run.dir={resumed}",
    )  # fmt: skip
    assert done.returncode == 0, resumed_out
    assert "resumed from" in resumed_out
    expected = {m["step"]: m for m in metrics(whole) if "loss" in m and m["step"] > 8}
    got = {m["step"]: m for m in metrics(resumed) if "loss" in m}
    assert got.keys() == expected.keys()
    for step in got:
        assert got[step]["loss"] == expected[step]["loss"], step
    assert held_out_losses(resumed_out)[-1] == held_out_losses(out)[-1]


# The launch scripts (launch/): tests/integration/test_launch_scripts.py.


def test_console_script_composes_the_config():
    script = Path(sys.executable).parent / "shardadam-train"
    done = subprocess.run(
        [str(script), "--cfg", "job", "optimizer.amsgrad=true"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "amsgrad: true" in done.stdout
    assert "_target_: shardadam.models.TinyTransformerLM" in done.stdout


# The app without the tensorboard package, which the test environment has: find_spec says none.
WITHOUT_TENSORBOARD = (
    "import importlib.util, sys; find = importlib.util.find_spec; "
    "importlib.util.find_spec = lambda n, *a: None if n == 'tensorboard' else find(n, *a); "
    "from shardadam.train import main; main()"
)


def test_tensorboard_without_the_package_fails_at_start(tmp_path):
    done, out = run_app(
        *MLP, "trainer.tensorboard=true", f"hydra.run.dir={tmp_path / 'run'}",
        launcher=[sys.executable, "-c", WITHOUT_TENSORBOARD],
    )  # fmt: skip
    assert done.returncode != 0
    assert "trainer.tensorboard=true needs the tensorboard package" in out, out
    assert "held-out loss" not in out
