"""shardadam.checkpoint in one process: round trips, publication, and every refusal."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zlib
from pathlib import Path

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
    assert info.extra["epoch"] == 2 and info.extra["pair"] == [1, "a"]
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
