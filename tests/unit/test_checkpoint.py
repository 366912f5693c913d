"""shardadam.checkpoint in one process: round trips, publication, and every refusal."""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from shardadam import ShardedAdam, checkpoint
from shardadam.checkpoint import CheckpointError


def make(hidden: int = 7, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)
    )
    options = {"learning_rate": 0.01, "amsgrad": True, "use_ema": True, "jit_compile": False}
    opt = ShardedAdam(model.named_parameters(), **{**options, **kwargs})
    return model, opt


def train(model, opt, start: int, count: int) -> None:
    for step in range(start, start + count):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def state_of(model, opt) -> dict:
    tensors = {f"model {k}": v.clone() for k, v in model.state_dict().items()}
    for i, entry in opt.state_dict()["state"].items():
        tensors.update({f"opt {i} {k}": v.clone() for k, v in entry.items()})
    return tensors


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def saved(tmp_path) -> Path:
    model, opt = make()
    train(model, opt, 0, 3)
    checkpoint.save(tmp_path, model=model, optimizer=opt)
    return tmp_path


def test_round_trip_continues_bit_identically(tmp_path):
    model, opt = make()
    train(model, opt, 0, 3)
    rng = torch.get_rng_state()
    extra = {"rng": rng, "epoch": 2, "pair": (1, "a"), "nested": {"w": torch.ones(2, 2)}}
    path = checkpoint.save(tmp_path, model=model, optimizer=opt, extra=extra)
    assert path == tmp_path / "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rank-00000.bin"]

    resumed_model, resumed_opt = make()
    train(resumed_model, resumed_opt, 100, 1)  # other weights and state
    info = checkpoint.load(tmp_path, model=resumed_model, optimizer=resumed_opt)
    assert (info.path, info.step, info.world_size) == (path, 3, 1)
    assert torch.equal(info.extra["rng"], rng)
    assert info.extra["epoch"] == 2 and info.extra["pair"] == (1, "a")  # a tuple, not a list
    assert torch.equal(info.extra["nested"]["w"], torch.ones(2, 2))
    assert resumed_opt.iterations == 3
    assert_same(state_of(resumed_model, resumed_opt), state_of(model, opt))
    train(model, opt, 3, 4)
    train(resumed_model, resumed_opt, 3, 4)
    assert_same(state_of(resumed_model, resumed_opt), state_of(model, opt))


def test_hyperparameters_and_exclusions_survive(tmp_path):
    model, opt = make(weight_decay=0.1)
    opt.param_groups[0]["lr"] = 0.003  # as a torch scheduler would
    opt.exclude_from_weight_decay(var_names=["bias"])
    train(model, opt, 0, 2)
    checkpoint.save(tmp_path, model=model, optimizer=opt)
    fresh_model, fresh = make(weight_decay=0.5)
    checkpoint.load(tmp_path, model=fresh_model, optimizer=fresh)
    assert fresh.param_groups[0]["lr"] == 0.003 and fresh.param_groups[0]["weight_decay"] == 0.1
    assert fresh._excluded_from_weight_decay() == opt._excluded_from_weight_decay()


def test_latest_keep_last_and_replacing_a_step(tmp_path):
    model, opt = make()
    for step in range(1, 5):
        train(model, opt, step, 1)
        checkpoint.save(tmp_path, model=model, optimizer=opt, step=step * 10, keep_last=2)
    assert [s for s, _ in checkpoint.published(tmp_path)] == [30, 40]
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000040"
    before = state_of(model, opt)
    train(model, opt, 9, 1)
    checkpoint.save(tmp_path, model=model, optimizer=opt, step=40)  # replaces step 40
    assert [s for s, _ in checkpoint.published(tmp_path)] == [30, 40]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    fresh_model, fresh = make()
    checkpoint.load(tmp_path, model=fresh_model, optimizer=fresh)
    assert not torch.equal(fresh_model[0].weight, before["model 0.weight"])
    assert torch.equal(fresh_model[0].weight, model[0].weight)


def test_saving_an_older_step_warns_that_load_takes_the_highest(tmp_path):
    model, opt = make()
    train(model, opt, 0, 1)
    checkpoint.save(tmp_path, model=model, optimizer=opt, step=50)
    with pytest.warns(RuntimeWarning, match=r"later steps \[50\]"):
        checkpoint.save(tmp_path, model=model, optimizer=opt, step=20, keep_last=1)
    assert [s for s, _ in checkpoint.published(tmp_path)] == [20, 50]  # never the one just saved


def test_model_only_and_optimizer_only(tmp_path):
    model, opt = make()
    train(model, opt, 0, 2)
    checkpoint.save(tmp_path / "model", model=model, step=7)
    checkpoint.save(tmp_path / "opt", optimizer=opt)
    fresh_model, fresh = make()
    assert checkpoint.load(tmp_path / "model", model=fresh_model).step == 7
    assert torch.equal(fresh_model[2].weight, model[2].weight)
    checkpoint.load(tmp_path / "opt", optimizer=fresh)
    assert fresh.iterations == 2
    with pytest.raises(CheckpointError, match="holds no model"):
        checkpoint.load(tmp_path / "opt", model=fresh_model)
    with pytest.raises(CheckpointError, match="holds no optimizer"):
        checkpoint.load(tmp_path / "model", optimizer=fresh)


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    model, opt = make()
    checkpoint.load(saved, model=model, optimizer=opt)
    manifest = json.loads((checkpoint.latest(saved) / "manifest.json").read_text())
    assert manifest["body"]["format"] == "shardadam.checkpoint"


def _refused(path, match, error=CheckpointError, **make_kwargs) -> None:
    """Loading raises ``error`` matching ``match`` and changes nothing."""
    model, opt = make(**make_kwargs)
    train(model, opt, 50, 1)
    before = state_of(model, opt)
    with pytest.raises(error, match=match):
        checkpoint.load(path, model=model, optimizer=opt)
    assert_same(state_of(model, opt), before)
    assert opt.iterations == 1


def test_refuses_a_truncated_file(saved):
    data = checkpoint.latest(saved) / "rank-00000.bin"
    data.write_bytes(data.read_bytes()[:-10])
    _refused(saved, r"rank-00000.bin holds \d+ bytes but the manifest records \d+")


def test_refuses_an_edited_byte(saved):
    data = checkpoint.latest(saved) / "rank-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    _refused(saved, r"fail their checksum: the file is corrupt")


def test_refuses_an_edited_manifest(saved):
    manifest = checkpoint.latest(saved) / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"step": 3', '"step": 4'))
    _refused(saved, "manifest.json fails its checksum")
    manifest.write_text(text[: len(text) // 2])
    _refused(saved, "manifest.json is corrupt")


def test_refuses_another_model(saved):
    _refused(saved, r"'0.weight' has shape \(9, 5\) here but \(7, 5\)", hidden=9)
    model, opt = make()
    bigger = torch.nn.Sequential(*model, torch.nn.Linear(2, 2))
    bigger_opt = ShardedAdam(bigger.named_parameters(), amsgrad=True, use_ema=True)
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: \['3.bias', '3.weight'\]"):
        checkpoint.load(saved, model=bigger, optimizer=bigger_opt)


def test_refuses_an_optimizer_with_other_options(saved):
    _refused(
        saved,
        "saved with use_ema=True but this optimizer has use_ema=False",
        ValueError,
        use_ema=False,
    )


def test_refuses_missing_and_unpublished_checkpoints(saved, tmp_path):
    _refused(tmp_path / "nowhere", "does not exist", FileNotFoundError)
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", "holds no published step-<N> directory", FileNotFoundError)
    partial = tmp_path / "empty" / ".partial-step-00000009-abc"
    partial.mkdir()
    _refused(tmp_path / "empty", "holds no published", FileNotFoundError)
    _refused(partial, "not a published checkpoint")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"step": -1}, ValueError, r"Invalid step: -1 \(expected an int >= 0\)"),
        ({"step": 1.5}, ValueError, "Invalid step: 1.5"),
        ({"keep_last": 0}, ValueError, r"Invalid keep_last: 0 \(expected an int >= 1 or None\)"),
        ({"extra": {"f": print}}, TypeError, "extra/f is a builtin_function_or_method"),
        ({"extra": {"a": {"__shardadam_tuple__": 1}}}, TypeError, "extra/a has the key"),
        ({"extra": {"o": np.array([None])}}, TypeError, "extra/o is a numpy array of dtype obj"),
        ({"extra": [1]}, TypeError, "extra must be a dict or None"),
        ({"model": None, "optimizer": None}, ValueError, "needs model=, optimizer= or both"),
    ],
)
def test_save_refuses_bad_arguments_and_writes_nothing(tmp_path, kwargs, error, match):
    model, opt = make()
    train(model, opt, 0, 1)
    with pytest.raises(error, match=match):
        checkpoint.save(tmp_path, **{"model": model, "optimizer": opt, **kwargs})
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def _rewrite_manifest(directory: Path, edit) -> None:
    """Apply ``edit`` to the manifest's body and give it a valid checksum again, so that only
    the edit itself can be refused."""
    manifest = directory / "manifest.json"
    body = json.loads(manifest.read_text())["body"]
    edit(body)
    crc = zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    manifest.write_text(json.dumps({"body": body, "crc32": crc}))


@pytest.mark.parametrize("where", ["../outside.bin", "absolute", "rank-00001.bin", "a list"])
def test_refuses_a_chunk_in_a_file_that_is_not_one_of_its_rank_files(saved, tmp_path, where):
    """A chunk pointing at an exact copy of the rank file outside the checkpoint (so that its
    checksum passes), by a relative or an absolute path, at a rank file the checkpoint does not
    list, or at no file name at all."""
    directory = checkpoint.latest(saved)
    outside = tmp_path / "outside.bin"
    shutil.copyfile(directory / "rank-00000.bin", outside)
    name = {"absolute": str(outside), "a list": ["rank-00000.bin"]}.get(where, where)

    def point_one_chunk_at_it(body):
        body["tensors"]["model/0.weight"]["chunks"][0]["file"] = name

    _rewrite_manifest(directory, point_one_chunk_at_it)
    _refused(
        saved,
        rf"'model/0.weight' has a chunk in {re.escape(repr(name))}, which is not one of "
        r"this checkpoint's rank files \['rank-00000.bin'\]",
    )


def test_refuses_a_listed_file_of_a_rank_that_did_not_save(saved):
    directory = checkpoint.latest(saved)
    shutil.copyfile(directory / "rank-00000.bin", directory / "rank-00003.bin")

    def list_it(body):
        body["files"]["rank-00003.bin"] = body["files"]["rank-00000.bin"]

    _rewrite_manifest(directory, list_it)
    _refused(saved, r"names 'rank-00003.bin', but the checkpoint was saved by 1 rank\(s\)")


def test_refuses_a_manifest_with_an_invalid_world_size(saved):
    def break_it(body):
        body["world_size"] = "1"

    _rewrite_manifest(checkpoint.latest(saved), break_it)
    _refused(saved, r"records an invalid world_size '1'")


def test_extra_round_trips_rng_states(tmp_path):
    """Python's and numpy's RNG states come back as the types their setters take, and set
    again they draw what the saved generators would have drawn next."""
    random.seed(1)
    np.random.seed(2)
    pcg, mt = np.random.default_rng(3), np.random.Generator(np.random.MT19937(4))
    extra = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "pcg64": pcg.bit_generator.state,  # 128-bit integers
        "mt19937": mt.bit_generator.state,  # a uint32 array inside a dict
        "cuda": [torch.get_rng_state(), torch.get_rng_state()],  # as get_rng_state_all()
        "numbers": np.arange(6, dtype=">i2").reshape(2, 3),  # big-endian: read back the same
        "counter": np.uint64(2**63 + 5),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    mt_key = extra["mt19937"]["state"]["key"]
    expected = [random.random(), np.random.rand(), pcg.random(), mt.integers(1 << 30)]
    model, _ = make()
    checkpoint.save(tmp_path, model=model, step=1, extra=extra)
    got = checkpoint.load(tmp_path, model=model).extra
    random.setstate(got["python"])
    np.random.set_state(got["numpy"])
    pcg.bit_generator.state = got["pcg64"]
    mt.bit_generator.state = got["mt19937"]
    assert [random.random(), np.random.rand(), pcg.random(), mt.integers(1 << 30)] == expected
    assert type(got["python"]) is tuple and type(got["python"][1]) is tuple
    assert got["numpy"][1].dtype == np.uint32 and got["numpy"][1].shape == (624,)
    assert [torch.equal(a, b) for a, b in zip(got["cuda"], extra["cuda"])] == [True, True]
    np.testing.assert_array_equal(got["numbers"], extra["numbers"])
    assert got["numbers"].dtype == np.int16 and got["empty"].shape == (0, 3)
    assert type(got["counter"]) is np.uint64 and got["counter"] == 2**63 + 5
    without_loading = checkpoint.read_extra(tmp_path)  # the same, in one process, no model
    assert without_loading["python"] == extra["python"] and without_loading.keys() == got.keys()
    np.testing.assert_array_equal(without_loading["mt19937"]["state"]["key"], mt_key)


def test_a_version_1_checkpoint_still_loads(saved):
    """Version 1 saved tuples as lists; they load as lists, tensors as tensors."""
    model, opt = make()
    train(model, opt, 0, 3)
    extra = {"pair": [1, "a"], "rng": torch.get_rng_state()}
    path = checkpoint.save(saved, model=model, optimizer=opt, step=5, extra=extra)

    def make_it_version_1(body):
        assert body["version"] == 2
        body["version"] = 1

    _rewrite_manifest(path, make_it_version_1)
    fresh_model, fresh = make()
    info = checkpoint.load(saved, model=fresh_model, optimizer=fresh)
    assert info.step == 5 and info.extra["pair"] == [1, "a"]
    assert torch.equal(info.extra["rng"], extra["rng"])
    assert_same(state_of(fresh_model, fresh), state_of(model, opt))


def fine_tune_model() -> torch.nn.Sequential:
    """make()'s body (keys 0.*) with another head: 2.weight of another shape, no 2.bias, and
    a new layer 3."""
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4, bias=False),
        torch.nn.Linear(4, 1),
    )  # fmt: skip


def test_strict_false_loads_what_matches_and_reports_the_rest(saved):
    model, opt = make()
    train(model, opt, 0, 3)  # what `saved` holds
    fine = fine_tune_model()
    before = {k: v.clone() for k, v in fine.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: \['3.bias', '3.weight'\]"):
        checkpoint.load(saved, model=fine)  # strict by default
    assert_same(dict(fine.state_dict()), before)
    info = checkpoint.load(saved, model=fine, strict=False)
    assert info.missing_keys == ("3.bias", "3.weight")
    assert info.unexpected_keys == ("2.bias",)
    assert info.mismatched_keys == ("2.weight",)
    assert torch.equal(fine[0].weight, model[0].weight)
    assert torch.equal(fine[0].bias, model[0].bias)
    for key in ["2.weight", "3.weight", "3.bias"]:
        assert torch.equal(fine.state_dict()[key], before[key]), key
    strict_info = checkpoint.load(saved, model=make()[0])
    assert strict_info.missing_keys == strict_info.unexpected_keys == ()
    assert strict_info.mismatched_keys == ()


def test_strict_false_with_an_optimizer_is_refused(saved):
    fine = fine_tune_model()
    fine_opt = ShardedAdam(fine.parameters(), jit_compile=False)
    before = {k: v.clone() for k, v in fine.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"load\(strict=False\) loads a model only.*fresh optimizer"
    ):
        checkpoint.load(saved, model=fine, optimizer=fine_opt, strict=False)
    assert_same(dict(fine.state_dict()), before)
    assert fine_opt.iterations == 0
    with pytest.raises(TypeError, match="strict must be True or False, got 'no'"):
        checkpoint.load(saved, model=fine, strict="no")
