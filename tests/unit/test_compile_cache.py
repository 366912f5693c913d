"""The first compiled step's start-up: inductor's vector-ISA probes, remembered across processes
(Note [vec ISA probes] in shardadam/kernels.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shardadam import kernels


def counting_probe(results: list[bool]):
    """A stand-in for ``VecISA._probe_load``: returns the next result, records each call."""
    calls = []

    def probe(isa, library_path):
        calls.append(library_path)
        return results[len(calls) - 1]

    return probe, calls


@pytest.fixture
def library(tmp_path):
    path = tmp_path / "probe.so"
    path.write_bytes(b"not really a library")
    return str(path)


def test_a_library_that_loaded_is_not_probed_again(library):
    probe, calls = counting_probe([True])
    remembering = kernels._remembering(probe)
    assert remembering(None, library) is True
    assert os.path.exists(library + kernels._PROBE_RECORD_SUFFIX)
    # Another process (the record is on disk, nothing is kept in memory).
    assert kernels._remembering(probe)(None, library) is True
    assert calls == [library]


def test_a_failed_load_is_probed_again_and_not_recorded(library):
    probe, calls = counting_probe([False, True])
    remembering = kernels._remembering(probe)
    assert remembering(None, library) is False
    assert not os.path.exists(library + kernels._PROBE_RECORD_SUFFIX)
    assert remembering(None, library) is True
    assert calls == [library, library]


def test_a_rebuilt_library_is_probed_again(library):
    probe, calls = counting_probe([True, False])
    remembering = kernels._remembering(probe)
    assert remembering(None, library) is True
    with open(library, "ab") as file:
        file.write(b", rebuilt")
    assert remembering(None, library) is False  # the new library's own result
    assert len(calls) == 2


def test_a_library_that_cannot_be_read_is_probed(tmp_path):
    probe, calls = counting_probe([True, True])
    missing = str(tmp_path / "missing.so")
    remembering = kernels._remembering(probe)
    assert remembering(None, missing) and remembering(None, missing)
    assert len(calls) == 2


PROBES = """
import torch
from torch._inductor import cpu_vec_isa
from shardadam import kernels

calls = []
probe = cpu_vec_isa.VecISA._probe_load

def counted(isa, library_path):
    calls.append(library_path)
    return probe(isa, library_path)

cpu_vec_isa.VecISA._probe_load = counted
kernels._remember_vec_isa_probes()
kernels._remember_vec_isa_probes()  # once only
isa = cpu_vec_isa.pick_vec_isa()
print("picked:", str(isa), "valid:", [str(i) for i in cpu_vec_isa.valid_vec_isa_list()])
print("probes:", len(calls))
"""


def test_a_second_process_runs_no_probe_and_picks_the_same_isa(tmp_path):
    pytest.importorskip("torch._inductor.cpu_vec_isa")
    from torch._inductor import cpu_vec_isa

    if not hasattr(cpu_vec_isa.VecISA, "_probe_load"):
        pytest.skip("this torch probes otherwise: nothing is remembered")
    outputs = []
    for _ in range(2):  # with the process's own inductor cache, warm where tests compiled
        done = subprocess.run(
            [sys.executable, "-c", PROBES], capture_output=True, text=True, timeout=600,
            cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.splitlines())
    assert outputs[0][0] == outputs[1][0]
    assert outputs[1][1] == "probes: 0"


def test_a_compiling_runner_remembers_from_its_construction(monkeypatch):
    cpu_vec_isa = pytest.importorskip("torch._inductor.cpu_vec_isa")
    probe = getattr(cpu_vec_isa.VecISA, "_probe_load", None)
    if probe is None or not kernels.compile_available():
        pytest.skip("nothing to remember with this torch")
    monkeypatch.setattr(cpu_vec_isa.VecISA, "_probe_load", getattr(probe, "__wrapped__", probe))
    kernels.UpdateRunner(jit_compile=False)
    assert not hasattr(cpu_vec_isa.VecISA._probe_load, "_shardadam_remembers")
    kernels.UpdateRunner(jit_compile=True)  # before the user's first compilation, too
    assert cpu_vec_isa.VecISA._probe_load._shardadam_remembers
