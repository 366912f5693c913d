"""Starting torch.distributed from whatever launched this process.

Four modes, tried in this order by :func:`start_process_group` (and so by
:func:`distributed_from_env` and ``shardadam.process_group.distributed_job``):

1. **torchrun** (RANK and WORLD_SIZE set): torchrun also sets LOCAL_RANK, MASTER_ADDR and
   MASTER_PORT, so the process group starts from the environment (``env://``).
2. **MPI** (``mpiexec``/``mpirun`` of Open MPI, MPICH or Intel MPI, a PMIx launcher, or
   ``srun --mpi=pmi2``/``pmix``), recognised by the PMI variables those launchers set (see
   :func:`detect_launch`). mpi4py, imported only then, gives the rank, the world size and the
   rank within the node; rank 0 picks a TCP rendezvous and broadcasts it over MPI, and
   torch.distributed starts from it (MPI carries nothing else). The rendezvous is
   MASTER_ADDR:MASTER_PORT where set, else 127.0.0.1 when every rank shares rank 0's host or
   rank 0's hostname's address, and a free port.
   A launch of one MPI rank runs as a single process.
3. **Slurm's srun** without PMI variables (SLURM_STEP_ID set): srun's own variables give the
   rank, the world size, the local rank and the host of task 0 (``shardadam.slurm``); no MPI.
4. **A single process** otherwise: no process group; the optimizer's collectives do nothing.

The backend is NCCL when CUDA is available (one GPU per rank, see :func:`select_device`) and
gloo on the CPU otherwise, unless ``backend=`` says which.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import slurm
from .config import BACKENDS


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchInfo:
    """How this process was launched, as its environment says (no communication).

    ``launcher`` is ``"torchrun"``, ``"mpi"`` or ``"slurm"``; ``source`` names the variable
    that told, for messages (``"PMI_SIZE=2"``). For MPI the numbers are hints (``None``
    where the launcher does not export them); MPI.COMM_WORLD has the final word.
    """

    launcher: str
    source: str
    rank: int | None
    world_size: int | None
    local_rank: int | None


def detect_launch(environ: Mapping[str, str]) -> LaunchInfo | None:
    """The launcher that started this process, from its environment; ``None`` for none."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return LaunchInfo(
            "torchrun",
            f"WORLD_SIZE={environ['WORLD_SIZE']}",
            _env_int(environ, "RANK"),
            _env_int(environ, "WORLD_SIZE"),
            _env_int(environ, "LOCAL_RANK", default=0),
        )
    return _detect_other_launch(environ)


class _LauncherEnvironment(NamedTuple):
    """Where one launcher puts the rank and the world size in each process's environment."""

    launcher: str  # "mpi": mpi4py has the final word; "slurm": these variables have
    markers: tuple[str, ...]  # any of these set: this launcher started the process
    rank: str
    world_size: tuple[str, ...]  # the first one set
    local_rank: str | None


# Most specific first: srun with --mpi=pmi2 or pmix also sets PMI_* or PMIX_*, and so do the
# ranks of an mpiexec inside a Slurm job, whose SLURM_* variables describe mpiexec's own srun
# (one task per node), not the ranks: the PMI variables win.
_LAUNCHER_ENVIRONMENTS = (
    _LauncherEnvironment(  # Open MPI's mpirun (also under PMIx)
        "mpi",
        ("OMPI_COMM_WORLD_SIZE",),
        "OMPI_COMM_WORLD_RANK",
        ("OMPI_COMM_WORLD_SIZE",),
        "OMPI_COMM_WORLD_LOCAL_RANK",
    ),
    _LauncherEnvironment(  # MPICH's Hydra, Intel MPI, srun --mpi=pmi2
        "mpi", ("PMI_SIZE", "PMI_RANK"), "PMI_RANK", ("PMI_SIZE",), "MPI_LOCALRANKID"
    ),
    _LauncherEnvironment(
        "mpi", ("PMIX_RANK",), "PMIX_RANK", (), None
    ),  # PMIx launchers: no size exported
    # SLURM_PROCID is also set in an sbatch script's own shell, which runs once; SLURM_STEP_ID
    # is set only inside srun, which starts the ranks.
    _LauncherEnvironment(
        "slurm",
        ("SLURM_STEP_ID",),
        "SLURM_PROCID",
        ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
        "SLURM_LOCALID",
    ),
)


def _detect_other_launch(environ: Mapping[str, str]) -> LaunchInfo | None:
    for launcher in _LAUNCHER_ENVIRONMENTS:
        marker = next((name for name in launcher.markers if name in environ), None)
        if marker is None:
            continue
        size_key = next((name for name in launcher.world_size if name in environ), None)
        told_by = size_key or marker
        return LaunchInfo(
            launcher.launcher,
            f"{told_by}={environ[told_by]}",
            _optional_env_int(environ, launcher.rank),
            _optional_env_int(environ, size_key),
            _optional_env_int(environ, launcher.local_rank),
        )
    return None


def _optional_env_int(environ: Mapping[str, str], name: str | None) -> int | None:
    return _env_int(environ, name) if name is not None and name in environ else None


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in environ and default is not None:
        return default
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(
            f"Invalid environment variable {name}={environ[name]!r} (expected an integer; "
            "check the launch command and the environment it passes on)"
        ) from None


def resolve_backend(backend: str, cuda_available: bool) -> str:
    """``"gloo"`` or ``"nccl"`` for the ``backend`` argument (``"auto"``: NCCL given CUDA)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (expected one of {BACKENDS})")
    if backend == "auto":
        return "nccl" if cuda_available else "gloo"
    if backend == "nccl" and not cuda_available:
        raise ValueError(
            "Invalid backend: 'nccl' needs CUDA, which torch does not see here "
            "(torch.cuda.is_available() is False); use backend='gloo' or 'auto'"
        )
    return backend


def check_world_size(
    world_size: int, expected_world_size: int | None, *, rank: int, source: str
) -> None:
    """Refuse a launch whose number of ranks is not the configured one.

    Called before any collective, so that every rank raises instead of some waiting forever.
    """
    if expected_world_size is None or world_size == expected_world_size:
        return
    launched = f"{world_size} ranks ({source})" if world_size > 1 else f"1 rank ({source})"
    raise RuntimeError(
        f"rank {rank}/{world_size}: launched with {launched} but "
        f"distributed.world_size={expected_world_size}; launch {expected_world_size} ranks "
        "or set distributed.world_size=null to accept any number"
    )


def select_device(
    backend: str, local_rank: int, *, rank: int = 0, world_size: int = 1
) -> torch.device:
    """The device this rank computes on; with NCCL, also makes it the current CUDA device.

    A rank uses GPU ``local_rank`` of those it sees, or GPU 0 when it sees exactly one:
    Slurm's ``--gpus-per-task`` and similar bindings give each rank only its own GPU.
    """
    if backend != "nccl":
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    index = 0 if visible == 1 else local_rank
    if index >= visible:
        raise RuntimeError(
            f"rank {rank}/{world_size}: local rank {local_rank} has no GPU: this process sees "
            f"{visible} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            f"launch at most {visible} ranks per node, or use backend='gloo'"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@dataclass(frozen=True)
class _Rendezvous:
    rank: int
    world_size: int
    local_rank: int
    init_method: str | None  # None: a single process, no process group


@contextlib.contextmanager
def distributed_from_env(
    timeout_s: float = 600.0, *, backend: str = "auto", expected_world_size: int | None = None
) -> Iterator[DistributedContext]:
    """Collective across the launch's ranks: start the default process group for however this
    process was launched (see the module docstring), and destroy it on exit, also on an
    exception: a rank that exits with the group alive may abort the others.

    ``backend``: ``"auto"``, ``"gloo"`` or ``"nccl"``. ``expected_world_size``: if given, a
    launch with another number of ranks raises on every rank before any communication.
    """
    backend = resolve_backend(backend, torch.cuda.is_available())
    context = start_process_group(timeout_s, backend, expected_world_size)
    if not dist.is_initialized():  # a single process
        yield context
        return
    try:
        yield context
    finally:
        dist.destroy_process_group()


def start_process_group(
    timeout_s: float, backend: str, expected_world_size: int | None
) -> DistributedContext:
    """Collective: start the default process group for however this process was launched
    (none for one rank); ``backend`` is ``"gloo"`` or ``"nccl"`` (see :func:`resolve_backend`).
    The caller destroys the group."""
    _check_arguments(timeout_s, expected_world_size)
    rendezvous = _find_rendezvous(detect_launch(os.environ), expected_world_size)
    device = select_device(
        backend, rendezvous.local_rank, rank=rendezvous.rank, world_size=rendezvous.world_size
    )
    if rendezvous.init_method is not None:
        dist.init_process_group(
            backend,
            init_method=rendezvous.init_method,
            rank=rendezvous.rank,
            world_size=rendezvous.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistributedContext(rendezvous.rank, rendezvous.world_size, rendezvous.local_rank, device)


def _check_arguments(timeout_s: float, expected_world_size: int | None) -> None:
    if not timeout_s > 0:
        raise ValueError(f"Invalid timeout_s: {timeout_s} (expected timeout_s > 0)")
    if expected_world_size is None:
        return
    if isinstance(expected_world_size, bool) or not isinstance(expected_world_size, int):
        raise TypeError(
            f"expected_world_size must be an int or None, got {type(expected_world_size).__name__}"
        )
    if expected_world_size < 1:
        raise ValueError(
            f"Invalid expected_world_size: {expected_world_size} "
            "(expected expected_world_size >= 1, or None to accept any)"
        )


def _find_rendezvous(launch: LaunchInfo | None, expected_world_size: int | None) -> _Rendezvous:
    if launch is None:
        check_world_size(1, expected_world_size, rank=0, source="no torchrun or MPI launch found")
        return _Rendezvous(0, 1, 0, None)
    if launch.launcher == "torchrun":
        check_world_size(
            launch.world_size, expected_world_size, rank=launch.rank, source=launch.source
        )
        return _Rendezvous(launch.rank, launch.world_size, launch.local_rank, "env://")
    if launch.world_size == 1:  # `mpiexec -n 1` needs neither mpi4py nor a group
        check_world_size(1, expected_world_size, rank=0, source=launch.source)
        return _Rendezvous(0, 1, 0, None)
    if launch.launcher == "slurm":
        return _rendezvous_from_slurm(launch, expected_world_size)
    return _rendezvous_over_mpi(launch, expected_world_size)


def _rendezvous_from_slurm(launch: LaunchInfo, expected_world_size: int | None) -> _Rendezvous:
    """srun's variables only: every task computes the same endpoint (``shardadam.slurm``)."""
    if launch.rank is None or launch.world_size is None:
        raise RuntimeError(
            f"srun launched this process ({launch.source}) but did not set SLURM_PROCID and "
            "SLURM_STEP_NUM_TASKS or SLURM_NTASKS: start the ranks with srun itself"
        )
    where = f"rank {launch.rank}/{launch.world_size}"
    check_world_size(launch.world_size, expected_world_size, rank=launch.rank, source=launch.source)
    try:
        init_method = slurm.rendezvous_endpoint(os.environ)
    except (RuntimeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
    return _Rendezvous(launch.rank, launch.world_size, launch.local_rank or 0, init_method)


def _rendezvous_over_mpi(launch: LaunchInfo, expected_world_size: int | None) -> _Rendezvous:
    """Collective over MPI.COMM_WORLD: rank 0 picks a TCP endpoint and tells the others."""
    MPI = _import_mpi(launch)
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    _check_mpi_agrees(launch, rank, world_size, MPI)
    check_world_size(world_size, expected_world_size, rank=rank, source=launch.source)
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, ranks_on_node = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    if world_size == 1:
        return _Rendezvous(0, 1, 0, None)
    choice = (
        _choose_endpoint_or_error(os.environ, ranks_on_node == world_size) if rank == 0 else None
    )
    init_method, error = comm.bcast(choice, root=0)
    if error is not None:  # raised on every rank, so none waits for a rendezvous
        raise RuntimeError(
            f"rank {rank}/{world_size}: rank 0 could not choose a rendezvous: {error}"
        )
    return _Rendezvous(rank, world_size, local_rank, init_method)


def _import_mpi(launch: LaunchInfo):
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise RuntimeError(
            f"launched under MPI ({launch.source}) but mpi4py is not installed: "
            "pip install 'shardadam[mpi]', or launch with torchrun (or, under Slurm, with "
            "srun --mpi=none: srun's own variables need no MPI)"
        ) from error
    return MPI


def _check_mpi_agrees(launch: LaunchInfo, rank: int, world_size: int, MPI) -> None:
    # mpi4py built against one MPI but started by another's mpiexec sees a world of 1 in every
    # process: that would be N independent runs, not one run on N ranks.
    if launch.world_size is None or launch.world_size == world_size:
        return
    raise RuntimeError(
        f"rank {rank}/{world_size}: the launcher says {launch.world_size} ranks "
        f"({launch.source}) but mpi4py's MPI.COMM_WORLD has {world_size}; mpi4py uses "
        f"{MPI.Get_library_version().splitlines()[0].strip()!r}, so launch with that MPI's "
        "mpiexec (or srun --mpi=pmi2/pmix), or rebuild mpi4py against the launcher's MPI"
    )


def _choose_endpoint_or_error(
    environ: Mapping[str, str], one_host: bool
) -> tuple[str | None, str | None]:
    """(``tcp://`` init method, None), or (None, why not): an error must reach every rank."""
    try:
        host = environ.get("MASTER_ADDR") or ("127.0.0.1" if one_host else _host_address())
        port = _env_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else _free_port()
    except (OSError, ValueError) as error:
        return None, str(error)
    host = f"[{host}]" if ":" in host else host  # an IPv6 literal
    return f"tcp://{host}:{port}", None


def _host_address() -> str:
    """An address of this host that other hosts may reach: not a loopback one."""
    name = socket.gethostname()
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        if not address.startswith("127.") and address != "::1":
            return address
    raise OSError(
        f"host {name!r} resolves only to loopback addresses {addresses}, which ranks on other "
        "nodes cannot reach; set MASTER_ADDR to an address of rank 0's node"
    )


def _free_port() -> int:
    # The port is free now; another program could take it before the store binds it, which
    # then fails with an error naming the port (set MASTER_PORT to choose one).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
