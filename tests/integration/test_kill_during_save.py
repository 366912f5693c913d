"""kill -9 while a checkpoint is being saved, or re-saved over the same step: the previous one
still loads, and the half-written one is never picked up (Notes [atomic publication] and
[re-saving a step] in shardadam.checkpoint)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardadam import checkpoint
from tests.integration.save_forever import make

REPO = Path(__file__).resolve().parents[2]
TRIALS = 3


def _run_and_kill(root: Path, rng: random.Random) -> int:
    """Start the saving job, SIGKILL all its processes at a random point inside a save (once
    two steps are published); returns the last published step."""
    job = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.save_forever", str(root)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the ranks die with it
    )
    durations, last_published = [], 0
    try:
        deadline = time.monotonic() + 120
        for line in job.stdout:
            if time.monotonic() > deadline:
                raise AssertionError("the saving job did not publish in time")
            words = line.split()
            if words[0] == "published":
                last_published = int(words[1])
                durations.append(float(words[2]))
            elif words[0] == "saving" and last_published >= 2:
                time.sleep(rng.uniform(0, 0.9 * min(durations)))
                break
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        job.stdout.close()
    return last_published


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    rng = random.Random(os.getpid())
    killed_mid_save = 0
    for trial in range(TRIALS):
        root = tmp_path / f"trial{trial}"
        last_published = _run_and_kill(root, rng)
        # What only an unfinished save leaves: a hidden directory, or a re-save's new copy.
        killed_mid_save += any(p.name.startswith(".") or "." in p.name for p in root.iterdir())
        steps = [step for step, _ in checkpoint.published(root)]
        # keep_last=2; a save the kill interrupted after its rename may have published too.
        assert steps[-1] >= last_published and len(steps) in (2, 3), steps
        model, opt = make()
        info = checkpoint.load(root, model=model, optimizer=opt)  # reads and checks every chunk
        assert info.step == steps[-1] and opt.iterations == steps[-1]
        assert info.path.name == f"step-{steps[-1]:08d}"
        # The next save clears what the killed one left behind.
        checkpoint.save(root, model=model, optimizer=opt, step=10_000)
        assert not [p for p in root.iterdir() if "." in p.name], list(root.iterdir())
    assert killed_mid_save >= 1, "no trial killed the job while it was saving"
