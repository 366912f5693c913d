"""The README's Python examples and its main job run, so that they cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where examples write (checkpoints)
    exec(compile(python_blocks()[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_commands_are_the_ones_ci_and_users_run():
    text = README.read_text()
    assert "pip install -e . && launch/torchrun.sh" in text
    assert "python -m pytest" in (README.parent / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0 && pip install -e '.[test,mpi]' && python -m pytest" in text


def test_main_job_learns(capsys):
    from shardadam import toy

    ema_test_loss = toy.main(["--steps", "150", "--no-jit"])
    out = capsys.readouterr().out
    first = float(re.search(r"held-out loss before training: ([0-9.]+)", out).group(1))
    assert ema_test_loss < 0.1 * first
