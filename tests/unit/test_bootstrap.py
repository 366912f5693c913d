"""Launcher detection on fake environments, argument errors, and the single-process path."""

from __future__ import annotations

import socket
import sys
import types

import pytest
import torch
import torch.distributed as dist

from shardadam import bootstrap, process_group, slurm
from shardadam.bootstrap import (
    LaunchInfo,
    check_world_size,
    detect_launch,
    distributed_from_env,
    resolve_backend,
)

# Every variable detect_launch reads, removed so that the test runner's own launch (if any)
# does not leak into a test.
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_SIZE",
    "PMI_RANK",
    "MPI_LOCALRANKID",
    "PMIX_RANK",
    "SLURM_STEP_ID",
    "SLURM_PROCID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.fixture
def no_launch(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- detect_launch -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ, expected",
    [
        pytest.param(
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0"},
            LaunchInfo("torchrun", "WORLD_SIZE=4", 3, 4, 1),
            id="torchrun",
        ),
        pytest.param(
            {"RANK": "0", "WORLD_SIZE": "1"},
            LaunchInfo("torchrun", "WORLD_SIZE=1", 0, 1, 0),
            id="torchrun-without-local-rank",
        ),
        pytest.param(  # torchrun started by an MPI or Slurm launcher: torchrun starts the ranks
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "PMI_SIZE": "1", "PMI_RANK": "0"},
            LaunchInfo("torchrun", "WORLD_SIZE=2", 1, 2, 1),
            id="torchrun-inside-mpi",
        ),
        pytest.param(
            {
                "OMPI_COMM_WORLD_SIZE": "8",
                "OMPI_COMM_WORLD_RANK": "5",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "PMIX_RANK": "5",
            },
            LaunchInfo("mpi", "OMPI_COMM_WORLD_SIZE=8", 5, 8, 1),
            id="open-mpi",
        ),
        pytest.param(
            {"PMI_SIZE": "2", "PMI_RANK": "1", "MPI_LOCALRANKID": "1", "PMI_FD": "11"},
            LaunchInfo("mpi", "PMI_SIZE=2", 1, 2, 1),
            id="mpich-hydra",
        ),
        pytest.param(
            {"PMI_RANK": "2"},
            LaunchInfo("mpi", "PMI_RANK=2", 2, None, None),
            id="pmi-rank-only",
        ),
        pytest.param(
            {"PMIX_RANK": "3", "PMIX_NAMESPACE": "prterun-1"},
            LaunchInfo("mpi", "PMIX_RANK=3", 3, None, None),
            id="pmix",
        ),
        pytest.param(
            {
                "SLURM_JOB_ID": "77",
                "SLURM_STEP_ID": "0",
                "SLURM_PROCID": "6",
                "SLURM_STEP_NUM_TASKS": "8",
                "SLURM_NTASKS": "16",
                "SLURM_LOCALID": "2",
            },
            LaunchInfo("slurm", "SLURM_STEP_NUM_TASKS=8", 6, 8, 2),
            id="srun",
        ),
        pytest.param(
            {"SLURM_STEP_ID": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
            LaunchInfo("slurm", "SLURM_NTASKS=2", 1, 2, None),
            id="srun-ntasks-only",
        ),
        pytest.param(  # srun --mpi=pmi2: the PMI variables are read first, with the same answer
            {
                "SLURM_STEP_ID": "0",
                "SLURM_PROCID": "1",
                "SLURM_STEP_NUM_TASKS": "2",
                "PMI_RANK": "1",
                "PMI_SIZE": "2",
            },
            LaunchInfo("mpi", "PMI_SIZE=2", 1, 2, None),
            id="srun-pmi2",
        ),
    ],
)
def test_detect_launch_reads_each_launchers_variables(environ, expected):
    assert detect_launch(environ) == expected


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({}, id="nothing"),
        pytest.param({"MASTER_ADDR": "node0", "LOCAL_RANK": "0"}, id="torchrun-half-set"),
        pytest.param(  # the batch script's own shell: it runs once, srun starts the ranks
            {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"},
            id="sbatch-without-srun",
        ),
    ],
)
def test_detect_launch_finds_no_launcher(environ):
    assert detect_launch(environ) is None


def test_detect_launch_names_a_variable_that_is_not_an_integer():
    with pytest.raises(ValueError, match=r"PMI_SIZE='two'.*expected an integer"):
        detect_launch({"PMI_SIZE": "two", "PMI_RANK": "0"})


# --- arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, cuda_available, expected",
    [
        ("auto", False, "gloo"),
        ("auto", True, "nccl"),
        ("gloo", True, "gloo"),
        ("gloo", False, "gloo"),
        ("nccl", True, "nccl"),
    ],
)
def test_resolve_backend(backend, cuda_available, expected):
    assert resolve_backend(backend, cuda_available) == expected


def test_nccl_without_cuda_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"backend: 'nccl' needs CUDA.*backend='gloo' or 'auto'"):
        resolve_backend("nccl", cuda_available=False)


def test_unknown_backend_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"Invalid backend: 'mpi' \(expected one of .*'auto'"):
        resolve_backend("mpi", cuda_available=False)
    with pytest.raises(TypeError, match="backend must be a str, got int"):
        resolve_backend(1, cuda_available=False)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"expected_world_size": 0}, ValueError, r"Invalid expected_world_size: 0"),
        ({"expected_world_size": "2"}, TypeError, r"expected_world_size must be an int"),
        ({"expected_world_size": True}, TypeError, r"expected_world_size must be an int"),
        ({"timeout_s": 0}, ValueError, r"Invalid timeout_s: 0"),
        ({"backend": "NCCL"}, ValueError, r"Invalid backend: 'NCCL'"),
    ],
)
def test_distributed_from_env_refuses_bad_arguments(no_launch, kwargs, error, message):
    with pytest.raises(error, match=message):
        with distributed_from_env(**kwargs):
            pass


# --- expected world size -------------------------------------------------------------------


def test_check_world_size_accepts_a_match_or_none():
    check_world_size(4, 4, rank=1, source="PMI_SIZE=4")
    check_world_size(4, None, rank=1, source="PMI_SIZE=4")


def test_check_world_size_says_what_to_change():
    with pytest.raises(RuntimeError) as caught:
        check_world_size(2, 4, rank=1, source="PMI_SIZE=2")
    assert str(caught.value) == (
        "rank 1/2: launched with 2 ranks (PMI_SIZE=2) but distributed.world_size=4; "
        "launch 4 ranks or set distributed.world_size=null to accept any number"
    )


def test_single_process_with_an_expected_world_size_of_two_fails(no_launch):
    with pytest.raises(RuntimeError, match=r"rank 0/1: launched with 1 rank .*world_size=2"):
        with distributed_from_env(expected_world_size=2):
            pass


# --- the single-process and one-rank paths -------------------------------------------------


def test_single_process_has_no_process_group(no_launch):
    with distributed_from_env(backend="gloo", expected_world_size=1) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.local_rank) == (0, 1, 0)
        assert ctx.is_main and ctx.device == torch.device("cpu")
        assert not dist.is_initialized()


def test_one_mpi_rank_runs_without_mpi4py(no_launch):
    no_launch.setitem(sys.modules, "mpi4py", None)  # any import of mpi4py now fails
    no_launch.setenv("PMI_SIZE", "1")
    no_launch.setenv("PMI_RANK", "0")
    with distributed_from_env(backend="gloo") as ctx:
        assert ctx.world_size == 1 and not dist.is_initialized()


def test_mpi_launch_without_mpi4py_says_how_to_install_it(no_launch):
    no_launch.setitem(sys.modules, "mpi4py", None)
    no_launch.setenv("PMI_SIZE", "2")
    no_launch.setenv("PMI_RANK", "0")
    with pytest.raises(RuntimeError, match=r"\(PMI_SIZE=2\) but mpi4py is not installed") as caught:
        with distributed_from_env(backend="gloo"):
            pass
    assert "pip install 'shardadam[mpi]'" in str(caught.value)
    assert isinstance(caught.value.__cause__, ImportError)


def test_torchrun_group_is_destroyed_on_an_exception(no_launch):
    one_rank_torchrun(no_launch)
    with pytest.raises(KeyError, match="from the training loop"):
        with distributed_from_env(timeout_s=30.0, backend="gloo") as ctx:
            assert dist.is_initialized() and dist.get_world_size() == 1
            assert ctx.device == torch.device("cpu")
            raise KeyError("from the training loop")
    assert not dist.is_initialized()


# --- rendezvous endpoint (rank 0 under MPI) ------------------------------------------------


def test_endpoint_on_one_host_is_the_loopback_with_a_free_port():
    init_method, error = bootstrap._choose_endpoint_or_error({}, one_host=True)
    assert error is None and init_method.startswith("tcp://127.0.0.1:")
    assert 0 < int(init_method.rsplit(":", 1)[1]) < 65536


def test_endpoint_honours_master_addr_and_port():
    environ = {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29501"}
    assert bootstrap._choose_endpoint_or_error(environ, one_host=False) == (
        "tcp://10.0.0.7:29501",
        None,
    )
    environ = {"MASTER_ADDR": "fd00::7", "MASTER_PORT": "29501"}
    assert bootstrap._choose_endpoint_or_error(environ, one_host=False)[0] == (
        "tcp://[fd00::7]:29501"
    )


def test_endpoint_errors_are_returned_to_be_broadcast_not_raised():
    init_method, error = bootstrap._choose_endpoint_or_error({"MASTER_PORT": "x"}, one_host=True)
    assert init_method is None and "MASTER_PORT='x'" in error


def test_several_hosts_without_a_reachable_address_ask_for_master_addr(monkeypatch):
    monkeypatch.setattr(
        bootstrap.socket,
        "getaddrinfo",
        lambda *args, **kwargs: [(None, None, None, "", ("127.0.1.1", 0))],
    )
    init_method, error = bootstrap._choose_endpoint_or_error({}, one_host=False)
    assert init_method is None and "set MASTER_ADDR" in error and "127.0.1.1" in error


# --- pieces that need a GPU or a second MPI, with stand-ins -------------------------------


def test_select_device_uses_the_local_rank_or_the_only_visible_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert bootstrap.select_device("nccl", 2) == torch.device("cuda", 2)
    with pytest.raises(RuntimeError, match=r"rank 5/8: local rank 4 has no GPU: .* sees 4"):
        bootstrap.select_device("nccl", 4, rank=5, world_size=8)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # Slurm bound one GPU per task
    assert bootstrap.select_device("nccl", 3) == torch.device("cuda", 0)
    assert chosen == [2, 0]
    assert bootstrap.select_device("gloo", 3) == torch.device("cpu")


class FakeWorld:
    """MPI.COMM_WORLD of an mpi4py built for another MPI than the launcher's: a world of 1."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1


def test_mpi4py_of_another_mpi_is_refused_not_run_as_separate_jobs(no_launch):
    fake_mpi = types.SimpleNamespace(
        COMM_WORLD=FakeWorld(), Get_library_version=lambda: "Open MPI v5.0.3\nmore"
    )
    no_launch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=fake_mpi))
    no_launch.setenv("PMI_SIZE", "2")
    no_launch.setenv("PMI_RANK", "0")
    message = r"rank 0/1: the launcher says 2 ranks \(PMI_SIZE=2\) but .* has 1; .*'Open MPI v5"
    with pytest.raises(RuntimeError, match=message):
        with distributed_from_env(backend="gloo"):
            pass


# --- Slurm: srun's own variables, no MPI -------------------------------------------------


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node7", ["node7"]),
        ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding: the numbers grow a digit
        ("a[098-101]", ["a098", "a099", "a100", "a101"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("x[5],y-z.example.org", ["x5", "y-z.example.org"]),
    ],
)
def test_expand_hostlist_reads_slurms_compressed_form(hostlist, hosts):
    assert slurm.expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize(
    "hostlist, why",
    [
        ("gpu[01-04", "a '\\[' is not closed"),
        ("gpu01-04]", "unbalanced or nested brackets"),
        ("gpu[0[1]]", "unbalanced or nested brackets"),
        ("gpu[04-01]", "the range '04-01' runs backwards"),
        ("gpu[a-b]", "'a-b' in brackets is not a number or a range"),
        ("gpu1,,gpu2", "an empty host name"),
    ],
)
def test_expand_hostlist_names_the_variable_and_the_fault(hostlist, why):
    with pytest.raises(ValueError, match=rf"Invalid SLURM_STEP_NODELIST='.*': {why} \(expected"):
        slurm.expand_hostlist(hostlist, "SLURM_STEP_NODELIST")


def test_rendezvous_port_is_unprivileged_below_the_ephemeral_range_and_differs_per_step():
    ports = {slurm.rendezvous_port(job, step) for job in (1, 77, 123456789) for step in (0, 1)}
    assert len(ports) == 6 and all(20000 <= port < 30000 for port in ports)
    assert slurm.rendezvous_port(77, 0) == slurm.rendezvous_port(77, 0)  # a requeued job's


SRUN_TASK_1_OF_2 = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_NODELIST": "gpu[03-04]",
    "SLURM_JOB_NODELIST": "gpu[01-04]",
}


def test_srun_without_pmi_needs_no_mpi4py_and_meets_on_the_steps_first_host(no_launch):
    no_launch.setitem(sys.modules, "mpi4py", None)  # any import of mpi4py now fails
    for name, value in SRUN_TASK_1_OF_2.items():
        no_launch.setenv(name, value)
    rendezvous = bootstrap._find_rendezvous(detect_launch(bootstrap.os.environ), 2)
    port = slurm.rendezvous_port(77, 0)
    assert rendezvous == bootstrap._Rendezvous(1, 2, 0, f"tcp://gpu03:{port}")
    no_launch.setenv("MASTER_ADDR", "10.1.2.3")
    no_launch.setenv("MASTER_PORT", "29511")
    assert bootstrap._find_rendezvous(detect_launch(bootstrap.os.environ), None).init_method == (
        "tcp://10.1.2.3:29511"
    )


def test_srun_launch_errors_name_the_rank_and_the_fix(no_launch):
    for name, value in SRUN_TASK_1_OF_2.items():
        no_launch.setenv(name, value)
    with pytest.raises(RuntimeError, match=r"launched with 2 ranks \(SLURM_STEP_NUM_TASKS=2\)"):
        bootstrap._find_rendezvous(detect_launch(bootstrap.os.environ), 4)
    no_launch.delenv("SLURM_STEP_NODELIST")
    no_launch.delenv("SLURM_JOB_NODELIST")
    with pytest.raises(RuntimeError, match=r"rank 1/2: srun .* set MASTER_ADDR to the host of"):
        bootstrap._find_rendezvous(detect_launch(bootstrap.os.environ), None)
    no_launch.setenv("SLURM_STEP_NODELIST", "gpu[03")
    with pytest.raises(ValueError, match=r"rank 1/2: Invalid SLURM_STEP_NODELIST='gpu\[03'"):
        bootstrap._find_rendezvous(detect_launch(bootstrap.os.environ), None)


def test_srun_with_pmi_variables_keeps_the_mpi_path_and_says_how_to_avoid_it(no_launch):
    no_launch.setitem(sys.modules, "mpi4py", None)
    for name, value in {**SRUN_TASK_1_OF_2, "PMIX_RANK": "1"}.items():
        no_launch.setenv(name, value)
    with pytest.raises(RuntimeError, match=r"\(PMIX_RANK=1\) .* srun --mpi=none"):
        with distributed_from_env(backend="gloo"):
            pass


# --- one process group for all the jobs of a process ------------------------------------


@pytest.fixture
def fresh_process_group(no_launch):
    no_launch.setattr(process_group, "_kept", None)  # this test's jobs start their own
    no_launch.setattr(process_group.atexit, "register", lambda function: None)
    return no_launch


def one_rank_torchrun(monkeypatch):
    for name, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(name, value)


def test_later_jobs_reuse_the_first_jobs_group_until_one_fails(fresh_process_group):
    one_rank_torchrun(fresh_process_group)
    with process_group.distributed_job(timeout_s=30.0, backend="gloo") as first:
        group = dist.group.WORLD
    fresh_process_group.setenv("MASTER_PORT", "1")  # a new rendezvous would fail: none is made
    with process_group.distributed_job(timeout_s=30.0, backend="gloo") as second:
        assert second is first and dist.group.WORLD is group
    with pytest.raises(KeyError):
        with process_group.distributed_job(timeout_s=30.0, backend="gloo"):
            raise KeyError("a job's own failure")
    assert not dist.is_initialized()  # the other ranks' collectives now fail at once
    with pytest.raises(RuntimeError, match=r"rank 0/1: an earlier job .*KeyError.*launch the"):
        with process_group.distributed_job(timeout_s=30.0, backend="gloo"):
            pass


def test_a_job_with_other_distributed_settings_is_refused(fresh_process_group):
    one_rank_torchrun(fresh_process_group)
    with process_group.distributed_job(backend="gloo", expected_world_size=1):
        pass
    message = r"distributed.timeout_s=5.0 here, but .* started with 600.0: .*separate launches"
    try:
        with pytest.raises(RuntimeError, match=message):
            with process_group.distributed_job(5.0, backend="gloo", expected_world_size=1):
                pass
    finally:
        process_group._destroy_kept_group()


def test_a_single_process_keeps_nothing_and_may_change_its_settings(fresh_process_group):
    with process_group.distributed_job(backend="gloo", expected_world_size=1) as ctx:
        assert ctx.world_size == 1 and not dist.is_initialized()
    with process_group.distributed_job(timeout_s=5.0, backend="gloo") as ctx:
        assert ctx.world_size == 1 and process_group._kept is None
