"""The app as users install it: a wheel, run from an empty directory by its console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_MODEL = '''
import torch


class Probe(torch.nn.Linear):
    """A model module in the directory the app runs from, as users keep theirs."""
'''


def _source_tree(into: Path) -> Path:
    """The files a clean clone has (git ls-files where this is a checkout)."""
    try:
        listed = (
            subprocess.run(
                ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60
            )
            .stdout.decode()
            .split("\0")
        )
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if ".venv" not in p.parts]
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from the tree and installed (without dependencies: they are this
    environment's) into a directory of its own; returns that directory."""
    root = tmp_path_factory.mktemp("wheel")
    source = _source_tree(root / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(root / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (root / "dist").glob("shardadam-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "shardadam/configs/config.yaml" in names
    assert "shardadam/configs/optimizer/schedule/warmup_cosine.yaml" in names
    assert "shardadam/data/corpus.txt" in names
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(root / "site"), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return root / "site"


def _run_installed(site: Path, cwd: Path, *arguments: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [str(site / "bin" / "shardadam-train"), *arguments],
        cwd=cwd, env=environ, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_installed_app_trains_from_an_empty_directory(installed, tmp_path):
    done = _run_installed(installed, tmp_path, "trainer.steps=20", "trainer.progress=false")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "held-out loss at step 20" in out
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert (run_dir / "checkpoints" / "step-00000020" / "manifest.json").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    probe = subprocess.run(
        [sys.executable, "-c", "import shardadam; print(shardadam.__file__)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.stdout.strip() == str(installed / "shardadam" / "__init__.py")


def test_the_console_script_imports_models_from_the_working_directory(installed, tmp_path):
    (tmp_path / "mymodel.py").write_text(LOCAL_MODEL)
    done = _run_installed(
        installed, tmp_path, "data=teacher_classification", "~model",
        "+model={_target_:mymodel.Probe,in_features:16,out_features:4}",
        "trainer.steps=3", "trainer.progress=false", "optimizer.jit_compile=false",
        "hydra.run.dir=run",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "held-out loss at step 3" in done.stdout + done.stderr
