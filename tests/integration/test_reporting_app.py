"""What the training app reports, end to end: its messages once on the console and once in
Hydra's train.log (also with two ranks), and metrics.jsonl after a requeued job's resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APP = [sys.executable, "-m", "shardadam.train"]
TORCHRUN = [str(REPO / "launch" / "torchrun.sh")]
SMALL = [
    "model=mlp_classifier", "data=teacher_classification", "optimizer.jit_compile=false",
    "trainer.progress=false", "trainer.steps=6", "trainer.eval_every=3",
    "trainer.checkpoint_every=3", "trainer.eval_samples=64",
]  # fmt: skip


def run_app(run_dir: Path, *overrides: str, launcher: list[str] = APP, env: dict | None = None):
    done = subprocess.run(
        [*launcher, *SMALL, f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def held_out_lines(text: str) -> list[str]:
    return re.findall(r"held-out loss [^\n]*", text)


@pytest.mark.parametrize("ranks", [1, 2])
def test_messages_are_in_train_log_once_and_on_the_console_once(tmp_path, ranks):
    launch = {"launcher": TORCHRUN, "env": {"NPROC_PER_NODE": str(ranks)}} if ranks > 1 else {}
    done = run_app(tmp_path, **launch)
    console = held_out_lines(done.stdout)
    assert [line.split(":")[0] for line in console] == [
        "held-out loss before training", "held-out loss at step 3", "held-out loss at step 6"
    ], done.stdout  # fmt: skip
    assert held_out_lines(done.stderr) == []
    log = (tmp_path / "train.log").read_text()
    assert held_out_lines(log) == console, log
    assert log.count("[shardadam.train][INFO] - held-out loss") == 3
    assert f"ranks: {ranks}; parameters: 5,508; trainable: 5,508;" in log
    assert "[INFO]" not in done.stdout  # the console has the bare messages


def test_a_requeued_job_leaves_each_step_once_in_metrics(tmp_path):
    run_app(tmp_path, "trainer.resume=auto")
    # As if the job had been killed after logging step 6 but before its checkpoint was done.
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000006")
    done = run_app(tmp_path, "trainer.resume=auto")
    assert re.search(r"resumed from \S+step-00000003 at step 3", done.stdout), done.stdout

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "loss" not in r] == [0, 3, 6]
    # The second job appended its messages to the same train.log.
    assert held_out_lines((tmp_path / "train.log").read_text())[-2:] == held_out_lines(done.stdout)
