"""Checkpoints saved at world size 2 load at 1, 2, 3 and 4 (and at 2 with other buckets and
stage) and continue as the uninterrupted run: bit-identical at the same world size and
sharding, within rtol 1e-6 elsewhere. Refusals happen on every rank and change nothing.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.distributed import checkpoint_cases as cases
from tests.distributed.spawn import run_ranks

SAVED_AT = 2
TIMEOUT_S = 30  # every collective: a rank that skips one fails the test instead of hanging it


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


def _at_save_world_size(rank: int, world_size: int, root: str) -> dict:
    return {
        "uninterrupted": cases.save_then_continue(rank, world_size, root),
        "resumed": {
            name: cases.load_then_continue(rank, world_size, root, sharding)
            for name, sharding in cases.RESHARDINGS.items()
        },
        "corrupt": cases.load_corrupt_on_one_rank(rank, world_size, root),
        "buffers": cases.save_and_load_per_rank_buffers(rank, world_size, root),
        "export": cases.save_for_export(rank, world_size, root),
    }


@functools.cache
def _results(root: Path) -> dict:
    """One spawn per world size; the checkpoints come from the world-size-2 run."""
    ranks = run_ranks(SAVED_AT, _at_save_world_size, str(root), timeout_s=TIMEOUT_S)
    at_two = ranks[0]
    resumed = {f"W=2 {name}": value for name, value in at_two["resumed"].items()}
    for world_size in (3, 4):
        resumed[f"W={world_size}"] = run_ranks(
            world_size, cases.load_then_continue, str(root), {}, timeout_s=TIMEOUT_S
        )[0]
    resumed["W=1"] = cases.load_then_continue(0, 1, str(root), {})  # one process, no group
    return {
        "uninterrupted": at_two["uninterrupted"],
        "resumed": resumed,
        "corrupt": [r["corrupt"] for r in ranks],
        "buffers": [r["buffers"] for r in ranks],
        "export": ranks[0]["export"],
    }


def _assert_state_equal(
    actual: dict, expected: dict, exact: bool, where: str, approximate: str = "\0"
) -> None:
    """Bit-identical if ``exact``, except state keys ending in ``approximate``."""
    assert actual["iterations"] == expected["iterations"], where
    pairs = [("model", k, actual["model"][k], expected["model"][k]) for k in expected["model"]]
    assert actual["optimizer"].keys() == expected["optimizer"].keys(), where
    for i, entry in expected["optimizer"].items():
        assert actual["optimizer"][i].keys() == entry.keys(), where
        pairs += [("optimizer", f"{i} {k}", actual["optimizer"][i][k], v) for k, v in entry.items()]
    for kind, key, got, want in pairs:
        message = f"{where}: {kind} {key}"
        if exact and not key.endswith(approximate):
            assert torch.equal(got, want), message
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8, msg=message)


RESUMED = ["W=2 same", "W=2 tiny_buckets+stage1", "W=1", "W=3", "W=4"]


@pytest.mark.parametrize("config", list(cases.CONFIGS))
@pytest.mark.parametrize("resumed", RESUMED)
def test_loaded_state_is_the_saved_state(root, resumed, config):
    results = _results(root)
    got = results["resumed"][resumed][config]
    assert got["step"] == cases.CONFIGS[config]["saved_at"]
    saved = results["uninterrupted"][config]["saved"]
    # Accumulated gradients reach another world size as the mean of the saved ranks' sums,
    # which consolidated_state_dict() averages again over the new ranks.
    approximate = "\0" if resumed.startswith("W=2") else "gradient_accumulator"
    where = f"{resumed} {config} loaded"
    _assert_state_equal(got["loaded"], saved, exact=True, where=where, approximate=approximate)


CONTINUED = [
    (resumed, config)
    for resumed in RESUMED
    for config, spec in cases.CONFIGS.items()
    if resumed == "W=2 same" or not spec.get("same_world_size_only")
]


@pytest.mark.parametrize("resumed, config", CONTINUED)
def test_resumed_run_equals_uninterrupted(root, resumed, config):
    got = _results(root)["resumed"][resumed][config]["final"]
    want = _results(root)["uninterrupted"][config]["final"]
    _assert_state_equal(got, want, exact=resumed == "W=2 same", where=f"{resumed} {config}")


def test_a_chunk_only_one_rank_reads_is_refused_on_every_rank(root):
    corrupt = _results(root)["corrupt"]
    for rank, result in enumerate(corrupt):
        assert result["error"] is not None, f"rank {rank} loaded a corrupt checkpoint"
        assert result["error"].startswith("rank 1/2: elements ["), result["error"]
        assert "fail their checksum: the file is corrupt" in result["error"]
    _assert_state_equal(corrupt[0]["after"], corrupt[0]["before"], exact=True, where="unchanged")


@pytest.mark.parametrize("kind", ["with-optimizer", "model-only"])
def test_tensors_not_optimized_come_whole_from_rank_0(root, kind):
    """BatchNorm statistics, its batch counter (one element) and a frozen bias differ per rank;
    after a load every rank holds rank 0's, not a mix of the ranks' pieces."""
    ranks = _results(root)["buffers"]
    rank_0 = ranks[0]["saved"]
    differ = ["norm.running_mean", "norm.running_var", "norm.num_batches_tracked", "head.bias"]
    for key in differ:
        assert not torch.equal(ranks[1]["saved"][key], rank_0[key]), f"{key} is the same"
    for rank, result in enumerate(ranks):
        loaded = result["loaded"][kind]
        assert loaded.keys() == rank_0.keys()
        for key in differ:
            assert torch.equal(loaded[key], rank_0[key]), f"rank {rank}: {key} {kind}"
        for key in rank_0.keys() - set(differ):  # optimized parameters: the same on all ranks
            assert torch.equal(loaded[key], result["saved"][key]), f"rank {rank}: {key} {kind}"


@pytest.mark.parametrize("config", cases.EXPORTED)
def test_exported_weights_and_ema_are_the_trained_ones(root, tmp_path, config):
    """Saved on 2 ranks, exported in this one process: the weights are rank 0's state_dict,
    the EMA is the optimizer's (swapped in, and each parameter's moving_average() in the
    parameter's dtype), and a fresh model takes either with strict=True."""
    import safetensors.torch

    from shardadam.export import export_weights

    want = _results(root)["export"][config]
    saved = root / "export" / config
    got = {
        "weights": safetensors.torch.load_file(export_weights(saved, tmp_path / "w.safetensors")),
        "ema": torch.load(export_weights(saved, tmp_path / "ema.pt", ema=True), weights_only=True),
    }
    for kind in ("weights", "ema"):
        assert got[kind].keys() == want[kind].keys(), kind
        for key, tensor in want[kind].items():
            assert got[kind][key].dtype == tensor.dtype, f"{kind} {key}"
            assert torch.equal(got[kind][key], tensor), f"{kind} {key}"
        cases.make(config)[0].load_state_dict(got[kind], strict=True)
    for name, average in want["averages"].items():
        assert torch.equal(got["ema"][name], average.to(got["ema"][name].dtype)), name
        assert not torch.equal(got["ema"][name], got["weights"][name]), name
    assert torch.equal(got["ema"]["input_scale"], want["weights"]["input_scale"])  # a buffer
