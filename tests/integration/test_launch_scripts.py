"""The launch scripts (launch/) as users run them: torchrun, mpirun and a Slurm batch script.

Slurm is played by a fake ``srun`` (SLURM_NTASKS copies of its command on this host, with
srun's variables, passing SIGUSR1 and SIGTERM on to them) and a fake ``scontrol`` that notes
its arguments, first on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra._internal.utils import get_args_parser

from shardadam import checkpoint
from shardadam.preemption import PREEMPTED_EXIT_CODE
from tests.integration.test_train_app import FAST, MLP, held_out_losses, metrics, run_app

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [str(REPO / "launch" / "torchrun.sh")]
MPIRUN = [str(REPO / "launch" / "mpirun.sh")]
SLURM = ["bash", str(REPO / "launch" / "slurm.sbatch")]
LAUNCH_ENV = {"PYTHON": sys.executable}


@pytest.mark.parametrize("ranks", [1, 2])
def test_torchrun_script_trains_the_default_model(tmp_path, ranks):
    run_dir = tmp_path / "run"
    done, out = run_app(
        "trainer.steps=30", "trainer.eval_every=0", "trainer.eval_samples=64",
        f"hydra.run.dir={run_dir}",
        launcher=TORCHRUN, env={**LAUNCH_ENV, "NPROC_PER_NODE": str(ranks)},
    )  # fmt: skip
    assert done.returncode == 0, out
    assert f"ranks: {ranks};" in out
    first, last = held_out_losses(out)[0], held_out_losses(out)[-1]
    assert last < 0.7 * first, out  # bytes: ln 256 = 5.5 at the start
    state_bytes = [m for m in metrics(run_dir) if "loss" in m][0]["optimizer_state_bytes_per_rank"]
    assert len(state_bytes) == ranks
    steps = checkpoint.published(run_dir / "checkpoints")
    assert [s for s, _ in steps] == [30]
    manifest = json.loads((steps[0][1] / "manifest.json").read_text())
    assert manifest["body"]["world_size"] == ranks


def test_torchrun_script_runs_a_two_rank_sweep_in_run_dir(tmp_path):
    """--multirun after the script (a flag Hydra refused once the script put an override
    first); both jobs on one process group (Note [one process group per process])."""
    sweep = tmp_path / "sweep"
    done, out = run_app(
        *MLP, "trainer.steps=3,4",
        launcher=[*TORCHRUN, "--multirun"], env={**LAUNCH_ENV, "RUN_DIR": str(sweep)},
    )  # fmt: skip
    assert done.returncode == 0, out
    assert out.count("ranks: 2;") == 2
    for job, steps in (("0", 3), ("1", 4)):
        assert [m["step"] for m in metrics(sweep / job) if "loss" in m] == list(range(1, steps + 1))
        assert [s for s, _ in checkpoint.published(sweep / job / "checkpoints")] == [steps]


@pytest.mark.mpi
def test_mpirun_script_trains_on_two_ranks(tmp_path):
    pytest.importorskip("mpi4py")
    if shutil.which("mpiexec", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("no mpiexec next to this Python (pip install 'shardadam[mpi]')")
    done, out = run_app(
        *MLP, "trainer.steps=40", f"hydra.run.dir={tmp_path / 'run'}",
        launcher=MPIRUN, env={**LAUNCH_ENV, "NPROC": "2"},
    )  # fmt: skip
    assert done.returncode == 0, out
    assert "ranks: 2;" in out
    first, last = held_out_losses(out)[0], held_out_losses(out)[-1]
    assert last < 0.8 * first, out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distributed.world_size=3"], "launched with 2 ranks .* but distributed.world_size=3"),
        (
            ["model._target_=tests.integration.app_models.RankDependentMLP"],
            r"rank [01]/2: .*parameter 'hidden.weight' has shape \(65, 16\)",
        ),
    ],
)
def test_two_rank_launch_errors_fail_on_every_rank(tmp_path, overrides, message):
    done, out = run_app(
        *MLP, f"hydra.run.dir={tmp_path / 'run'}", *overrides,
        launcher=TORCHRUN, env=LAUNCH_ENV,
    )  # fmt: skip
    assert done.returncode != 0
    assert re.search(message, out), out
    assert "held-out loss" not in out


# ---------------------------------------------------------------------- Slurm, faked

FAKE_SRUN = """#!{python}
import os, signal, subprocess, sys
from pathlib import Path

log = Path(os.environ["FAKE_SLURM_LOG"])
options, command = [], sys.argv[1:]
while command[0].startswith("-"):
    options.append(command.pop(0))
with open(log / "srun", "a") as record:
    record.write(" ".join(options) + "\\n")
step = len((log / "srun").read_text().splitlines()) - 1
tasks = int(os.environ["SLURM_NTASKS"])
step_env = {{"SLURM_STEP_ID": str(step), "SLURM_STEP_NUM_TASKS": str(tasks),
            "SLURM_STEP_NODELIST": "localhost"}}
children = []
def forward(number, frame):
    for child in children:
        child.send_signal(number)
signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
for rank in range(tasks):
    env = {{**os.environ, **step_env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}}
    children.append(subprocess.Popen(command, env=env))
(log / "task-pids").write_text(" ".join(str(child.pid) for child in children))
codes = [child.wait() for child in children]
sys.exit(max(code if code >= 0 else 128 - code for code in codes))
"""
FAKE_SCONTROL = '#!/bin/sh\necho "$@" >> "$FAKE_SLURM_LOG/scontrol"\n'
# Python with its own arguments, one a line: what the batch script hands the app.
ECHO_PYTHON = '#!/bin/sh\nfor argument in "$@"; do echo "$argument"; done\n'
# A stand-in for the app that waits for SIGUSR1, then ends as FAKE_APP_ENDS_<rank> says: an
# exit code, or "killed" (as srun --kill-on-bad-exit kills the tasks still running).
SIGNALLED_PYTHON = """#!/bin/sh
trap 'stopped=1' USR1
touch "$FAKE_SLURM_LOG/ready.$SLURM_PROCID"
while [ -z "$stopped" ]; do sleep 0.05; done
eval "end=\\$FAKE_APP_ENDS_$SLURM_PROCID"
[ "$end" = killed ] && kill -9 $$
exit "$end"
"""


@pytest.fixture
def slurm_job(tmp_path):
    """The environment of a batch job (id 7xxxx, 2 tasks, 1 CPU each) with srun and scontrol
    faked, and mpi4py unimportable: the job must need no MPI."""
    bin_dir, log, no_mpi = tmp_path / "bin", tmp_path / "slurm-log", tmp_path / "no-mpi"
    for directory in (bin_dir, log, no_mpi / "mpi4py"):
        directory.mkdir(parents=True)
    scripts = {"srun": FAKE_SRUN.format(python=sys.executable), "scontrol": FAKE_SCONTROL}
    scripts["python-echo"], scripts["python-signalled"] = ECHO_PYTHON, SIGNALLED_PYTHON
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (no_mpi / "mpi4py" / "__init__.py").write_text("raise ImportError('mpi4py is hidden')\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI", "OMPI_"))}
    environ.pop("RANK", None)
    environ.pop("WORLD_SIZE", None)
    environ.update(
        PATH=f"{bin_dir}{os.pathsep}{environ['PATH']}",
        PYTHONPATH=os.pathsep.join([str(no_mpi), str(REPO)]),
        PYTHON=sys.executable,
        FAKE_SLURM_LOG=str(log),
        SLURM_JOB_ID=str(70000 + os.getpid() % 10000),  # a port of its own (slurm.py)
        SLURM_NTASKS="2",
        SLURM_CPUS_PER_TASK="1",
    )
    return environ, log


def submit(environ: dict, cwd: Path, *arguments: str, **env) -> subprocess.Popen:
    output = open(cwd / "job.out", "a")  # noqa: SIM115
    return subprocess.Popen(
        [*SLURM, *arguments], cwd=cwd, env={**environ, **env}, stdout=output,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


FLAGS_AND_THEIR_VALUES = {"--cfg", "job", "--multirun", "-cd", "~/confs", "--config-name=big"}
FLAGS_AND_THEIR_VALUES.add("--info")


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ([], ["trainer.resume=auto"]),
        (["a=1", "--cfg", "job"], ["trainer.resume=auto", "a=1", "--cfg", "job"]),
        (
            ["--multirun", "-cd", "~/confs", "--config-name=big", "a=1,2", "b=3", "--info"],
            [
                "--multirun",
                "-cd",
                "~/confs",
                "--config-name=big",
                "trainer.resume=auto",
                "a=1,2",
                "b=3",
                "--info",
            ],
        ),  # fmt: skip
        (["--cfg", "job"], ["--cfg", "job", "trainer.resume=auto"]),
        (["a=1", "trainer.resume=null"], ["a=1", "trainer.resume=null"]),
        (["~trainer.resume"], ["~trainer.resume"]),
    ],
)
def test_slurm_script_passes_every_argument_and_adds_resume_where_hydra_takes_it(
    slurm_job, tmp_path, arguments, expected
):
    environ, log = slurm_job
    done = subprocess.run(
        [*SLURM, *arguments], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**environ, "PYTHON": "python-echo", "SLURM_NTASKS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    given = done.stdout.splitlines()
    assert given[:2] == ["-m", "shardadam.train"] and given[2:] == expected
    parsed = get_args_parser().parse_args(given[2:])  # Hydra's own argparse accepts them
    assert parsed.overrides == [a for a in expected if a not in FLAGS_AND_THEIR_VALUES]
    assert (log / "srun").read_text() == "--kill-on-bad-exit=1 --mpi=none --cpus-per-task=1\n"
    assert not (log / "scontrol").exists()


def wait_for_steps(run_dir: Path, count: int, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if (run_dir / "metrics.jsonl").exists():
            if len([m for m in metrics(run_dir) if "loss" in m]) >= count:
                return
        time.sleep(0.2)
    raise AssertionError(f"the job did not train {count} steps: {job.poll()=}")


def test_slurm_job_stops_on_the_signal_requeues_and_resumes_in_the_same_run_dir(
    slurm_job, tmp_path
):
    """Two tasks without mpi4py; SIGUSR1 to one task only: both stop after the same step
    with a checkpoint, exit code 75, scontrol requeue; the requeued job (same id) resumes."""
    environ, log = slurm_job
    run_dir = tmp_path / "outputs" / f"slurm-{environ['SLURM_JOB_ID']}"
    job = submit(environ, tmp_path, *MLP, *FAST, "trainer.steps=100000")
    try:
        wait_for_steps(run_dir, 3, job)
        os.kill(int((log / "task-pids").read_text().split()[1]), signal.SIGUSR1)
        assert job.wait(timeout=120) == PREEMPTED_EXIT_CODE, (tmp_path / "job.out").read_text()
    finally:
        job.kill()
    out = (tmp_path / "job.out").read_text()
    [(stopped, path)] = checkpoint.published(run_dir / "checkpoints")
    assert 3 <= stopped < 100000
    assert json.loads((path / "manifest.json").read_text())["body"]["world_size"] == 2
    # Said by rank 0, which did not get the signal: the ranks agreed on it.
    assert f"stopping after step {stopped} on SIGUSR1 to another rank" in out, out
    assert "ranks: 2;" in out and "mpi4py" not in out
    assert (log / "scontrol").read_text() == f"requeue {environ['SLURM_JOB_ID']}\n"

    requeued = submit(environ, tmp_path, *MLP, *FAST, f"trainer.steps={stopped + 2}")
    assert requeued.wait(timeout=120) == 0, (tmp_path / "job.out").read_text()
    out = (tmp_path / "job.out").read_text()
    assert f"resumed from {path} at step {stopped}" in out, out
    assert [s for s, _ in checkpoint.published(run_dir / "checkpoints")][-1] == stopped + 2
    assert [m["step"] for m in metrics(run_dir) if "loss" in m][-3:] == [
        stopped, stopped + 1, stopped + 2,
    ]  # fmt: skip
    assert (log / "scontrol").read_text().count("requeue") == 1
    assert (log / "srun").read_text().count("--cpus-per-task=1") == 2


@pytest.mark.parametrize(
    "ends, status, requeued",
    [
        (("75", "75"), PREEMPTED_EXIT_CODE, True),
        (("75", "killed"), 128 + signal.SIGKILL, True),
        (("0", "0"), 0, False),  # the run ended anyway: nothing to requeue
        (("1", "1"), 1, False),
    ],
)
def test_slurm_script_passes_its_signal_to_the_tasks_and_requeues_a_stopped_run(
    slurm_job, tmp_path, ends, status, requeued
):
    """#SBATCH --signal=B:USR1@120 signals the batch script, which passes it on to srun."""
    environ, log = slurm_job
    job = submit(
        environ, tmp_path, PYTHON="python-signalled",
        FAKE_APP_ENDS_0=ends[0], FAKE_APP_ENDS_1=ends[1],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(list(log.glob("ready.*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=30) == status, (tmp_path / "job.out").read_text()
    finally:
        job.kill()
    scontrol = log / "scontrol"
    assert (scontrol.read_text() if requeued else scontrol.exists()) == (
        f"requeue {environ['SLURM_JOB_ID']}\n" if requeued else False
    )


def test_slurm_job_runs_a_two_rank_sweep(slurm_job, tmp_path):
    environ, log = slurm_job
    job = submit(environ, tmp_path, "--multirun", *MLP, *FAST, "trainer.steps=2,3")
    assert job.wait(timeout=120) == 0, (tmp_path / "job.out").read_text()
    sweep = tmp_path / "outputs" / f"slurm-{environ['SLURM_JOB_ID']}"
    for job_dir, steps in ((sweep / "0", 2), (sweep / "1", 3)):
        assert [m["step"] for m in metrics(job_dir) if "loss" in m] == list(range(1, steps + 1))
        assert "resume: auto" in (job_dir / ".hydra" / "config.yaml").read_text()
