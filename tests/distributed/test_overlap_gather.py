"""overlap_param_gather=True on two gloo ranks with one rank's gather late: every forward and
every read after step() equals the same training without overlap, on both ranks, or the case
is refused on every rank with the documented error.

One spawn runs every case (spawning costs seconds here); the tests compare what it collected.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.overlap_cases import CASES, REFUSAL, run_cases
from tests.distributed.spawn import run_ranks

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_ranks(WORLD_SIZE, run_cases)


def assert_equal(ours: list, theirs: list, what: str) -> None:
    assert len(ours) == len(theirs), what
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{what}[{i}] differs")


@pytest.mark.parametrize("case", CASES)
def test_late_gather_changes_nothing(per_rank, case):
    for rank, results in enumerate(per_rank):
        ours, reference = results[case], results["reference"]
        assert_equal(ours["outputs"], reference["outputs"], f"rank {rank} forward outputs")
        if ours["reads"]:
            assert_equal(ours["reads"], reference["reads"], f"rank {rank} reads after step")
        for name, value in reference["params"].items():
            assert_equal([ours["params"][name]], [value], f"rank {rank} {name}")
    first = per_rank[0][case]["params"]
    for results in per_rank[1:]:
        for name, value in results[case]["params"].items():
            assert_equal([value], [first[name]], f"{name} across ranks")


def test_compiled_read_before_any_module_is_refused_on_every_rank(per_rank):
    for rank, results in enumerate(per_rank):
        assert REFUSAL in results["refused"], f"rank {rank}: {results['refused']!r}"
        assert f"rank {rank}/{WORLD_SIZE}" in results["refused"]
        assert "'body.bias'" in results["refused"]
