"""What ``srun`` tells each task it starts: its rank and the host of task 0, without MPI.

srun exports SLURM_PROCID (the rank), SLURM_STEP_NUM_TASKS (the world size), SLURM_LOCALID
(the rank within the node) and SLURM_STEP_NODELIST, the step's hosts in Slurm's compressed
form (``gpu[01-04,07],cpu3``). Task 0 runs on the first of them (srun's block and cyclic
distributions both start there), so it hosts the torch.distributed rendezvous, on a port
derived from the job and step ids: every task computes the same endpoint with no
communication at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# Slurm gives the same job id to a requeued job, and a new step id to each srun in a job:
# the port differs between concurrent steps of one job and, mostly, between jobs sharing a
# node. 20000-29999 is unprivileged and below Linux's ephemeral ports (32768-60999), which the
# kernel hands to outgoing connections.
_FIRST_PORT, _PORTS = 20000, 10000

_EXAMPLE = "expected a Slurm host list such as 'gpu[01-04,07],cpu3'"


def expand_hostlist(hostlist: str, name: str = "host list") -> list[str]:
    """The host names of a Slurm host list: ``"gpu[01-02,07],cpu3"`` gives ``["gpu01",
    "gpu02", "gpu07", "cpu3"]``; several bracket groups in one name give every combination.

    ``name`` (the variable it came from) is for the error a malformed list raises.
    """
    hosts = []
    for item in _split_top_level(hostlist, name):
        hosts.extend(_expand_name(item, hostlist, name))
    return hosts


def _split_top_level(hostlist: str, name: str) -> list[str]:
    """The comma-separated names, leaving the commas inside brackets alone."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(hostlist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(hostlist[start:index])
            start = index + 1
        if depth not in (0, 1):
            raise _invalid(name, hostlist, "unbalanced or nested brackets")
    if depth:
        raise _invalid(name, hostlist, "a '[' is not closed")
    items.append(hostlist[start:])
    if not all(items):
        raise _invalid(name, hostlist, "an empty host name")
    return items


def _expand_name(item: str, hostlist: str, name: str) -> list[str]:
    bracket = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", item)
    if bracket is None:
        return [item]
    prefix, ranges, rest = bracket.groups()
    tails = _expand_name(rest, hostlist, name) if rest else [""]
    numbers = _expand_ranges(ranges, hostlist, name)
    return [prefix + number + tail for number in numbers for tail in tails]


def _expand_ranges(ranges: str, hostlist: str, name: str) -> list[str]:
    """``"01-03,7"`` gives 01, 02, 03, 7: a range keeps the zero padding of its first bound."""
    numbers = []
    for part in ranges.split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if bounds is None:
            raise _invalid(name, hostlist, f"{part!r} in brackets is not a number or a range")
        first, last = bounds.group(1), bounds.group(2) or bounds.group(1)
        if int(last) < int(first):
            raise _invalid(name, hostlist, f"the range {part!r} runs backwards")
        numbers += [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    return numbers


def _invalid(name: str, hostlist: str, why: str) -> ValueError:
    return ValueError(f"Invalid {name}={hostlist!r}: {why} ({_EXAMPLE})")


def rendezvous_port(job_id: int, step_id: int) -> int:
    """The rendezvous port of a job step: the same in every task, different for another step
    of the job (and, mostly, for another job on the node)."""
    return _FIRST_PORT + (job_id * 16 + step_id) % _PORTS


def rendezvous_endpoint(environ: Mapping[str, str]) -> str:
    """``tcp://HOST:PORT`` for the tasks of this srun step: MASTER_ADDR and MASTER_PORT where
    set, else the step's first host and :func:`rendezvous_port`."""
    host = environ.get("MASTER_ADDR") or _first_host(environ)
    if "MASTER_PORT" in environ:
        port = _int(environ, "MASTER_PORT")
    else:
        port = rendezvous_port(_int(environ, "SLURM_JOB_ID"), _int(environ, "SLURM_STEP_ID"))
    host = f"[{host}]" if ":" in host else host  # an IPv6 literal
    return f"tcp://{host}:{port}"


def _first_host(environ: Mapping[str, str]) -> str:
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(name):
            return expand_hostlist(environ[name], name)[0]
    raise RuntimeError(
        "srun launched this process but set none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST "
        "and SLURM_NODELIST: set MASTER_ADDR to the host of task 0"
    )


def _int(environ: Mapping[str, str], name: str) -> int:
    if name not in environ:
        raise RuntimeError(
            f"srun launched this process but did not set {name}: set MASTER_PORT to the "
            "rendezvous port (the same for every task)"
        )
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(
            f"Invalid environment variable {name}={environ[name]!r} (expected an integer)"
        ) from None
