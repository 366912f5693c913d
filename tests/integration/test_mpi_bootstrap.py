"""Real MPI launches: ``mpiexec -n 2`` starts torch.distributed through shardadam.bootstrap.

Needs mpi4py and an mpiexec of the same MPI (``pip install 'shardadam[mpi]'`` installs both
into the environment; the mpiexec next to the interpreter is preferred for that reason).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.mpi

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("mpi_allreduce.py")
TIMEOUT_S = 120


def find_mpiexec() -> str:
    pytest.importorskip("mpi4py", reason="mpi4py is not installed: pip install 'shardadam[mpi]'")
    beside_python = Path(sys.executable).parent / "mpiexec"
    if beside_python.exists():
        return str(beside_python)
    on_path = shutil.which("mpiexec")
    if on_path is None:
        pytest.skip("no mpiexec next to the interpreter or on PATH: pip install 'shardadam[mpi]'")
    return on_path


def launch_env() -> dict[str, str]:
    """This environment without the test runner's own launch, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_launch(command: list[str], cwd: Path = REPO, **env) -> subprocess.CompletedProcess:
    """Run a launcher in its own session, and kill all of it, ranks too, on a timeout."""
    with subprocess.Popen(
        command,
        cwd=cwd,
        env={**launch_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{command} hung for {TIMEOUT_S} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def reports(stdout: str) -> dict[int, tuple[int, int, int]]:
    """``rank R/W local L sum S`` lines, as {rank: (world size, local rank, sum)}."""
    found = re.findall(r"rank (\d+)/(\d+) local (\d+) sum (\d+)", stdout)
    return {int(r): (int(w), int(local), int(s)) for r, w, local, s in found}


def test_two_mpi_ranks_all_reduce_over_gloo():
    done = run_launch([find_mpiexec(), "-n", "2", sys.executable, str(HELPER)])
    assert done.returncode == 0, done.stdout + done.stderr
    # One host: local ranks equal ranks; the sum of ranks 0 and 1 is 1.
    assert reports(done.stdout) == {0: (2, 0, 1), 1: (2, 1, 1)}, done.stdout + done.stderr


def test_a_world_size_mismatch_fails_on_every_rank_without_hanging():
    command = [find_mpiexec(), "-n", "2", sys.executable, str(HELPER), "--expected-world-size=3"]
    done = run_launch(command)
    assert done.returncode != 0
    for rank in (0, 1):  # the variable named depends on the MPI (PMI_SIZE for MPICH)
        message = (
            rf"rank {rank}/2: launched with 2 ranks \([A-Z_]+=2\) but distributed\.world_size=3; "
            r"launch 3 ranks or set distributed\.world_size=null"
        )
        assert re.search(message, done.stderr), done.stderr
    assert not reports(done.stdout)


# A stand-in for the Hydra app: the real shardadam.bootstrap (the package path is extended to
# the repository's), an all-reduce, and the arguments the launch script passed.
FAKE_TRAIN = """
import os
import sys

import torch
import torch.distributed as dist

from shardadam.bootstrap import distributed_from_env

with distributed_from_env(timeout_s=60.0, backend="gloo") as ctx:
    total = torch.tensor([ctx.rank])
    dist.all_reduce(total)
    print(f"rank {ctx.rank}/{ctx.world_size} local {ctx.local_rank} sum {int(total)}", flush=True)
    print(f"rank {ctx.rank} args {sys.argv[1:]}", flush=True)
    print(f"rank {ctx.rank} run dir {os.environ['SHARDADAM_RUN_DIR']}", flush=True)
"""


def test_mpirun_script_passes_overrides_and_one_run_dir_to_every_rank(tmp_path):
    mpiexec = find_mpiexec()
    fake = tmp_path / "shardadam"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"__path__.append({str(REPO / 'shardadam')!r})\n")
    (fake / "train.py").write_text(textwrap.dedent(FAKE_TRAIN))
    done = run_launch(
        [str(REPO / "launch" / "mpirun.sh"), "trainer.steps=5", "optimizer.learning_rate=3e-4"],
        cwd=tmp_path,
        NPROC="2",
        PYTHON=sys.executable,
        MPIEXEC=mpiexec,
        PYTHONPATH=str(tmp_path),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert reports(done.stdout) == {0: (2, 0, 1), 1: (2, 1, 1)}
    args = re.findall(r"rank \d args (\[.*?\])", done.stdout)  # (lines may be cut, see below)
    assert args == ["['trainer.steps=5', 'optimizer.learning_rate=3e-4']"] * 2, done.stdout
    # configs/config.yaml's hydra.run.dir reads it: one directory, chosen once, for every rank.
    # mpiexec forwards each rank's output in chunks that may cut a line: rank 0's newline can
    # come after rank 1's line, so the directory is read up to its last digit.
    run_dirs = re.findall(r"rank \d run dir (outputs/[0-9-]+/[0-9-]+)", done.stdout)
    assert len(run_dirs) == 2 and run_dirs[0] == run_dirs[1], done.stdout
    assert re.fullmatch(r"outputs/[0-9-]+/[0-9-]+", run_dirs[0]), run_dirs[0]
