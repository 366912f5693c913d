"""shardadam.export in one process: a checkpoint's weights (and EMA) as files that torch and
safetensors read without shardadam, compared with the trained model and the optimizer's EMA."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from shardadam import ShardedAdam, checkpoint, export
from shardadam.checkpoint import CheckpointError

VOCAB, WIDTH = 10, 6


class TiedModel(torch.nn.Module):
    """Tied weights (head = embedding), BatchNorm buffers, and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.norm = torch.nn.BatchNorm1d(WIDTH)
        self.frozen = torch.nn.Linear(WIDTH, WIDTH)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.frozen(self.norm(self.embed(ids)))))


def trained(dtype=torch.float32, steps: int = 4, **kwargs):
    torch.manual_seed(0)
    model = TiedModel().to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ShardedAdam(params, learning_rate=0.05, jit_compile=False, **{"use_ema": True, **kwargs})
    for step in range(steps):
        ids = torch.randint(VOCAB, (8,), generator=torch.Generator().manual_seed(step))
        model(ids).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def read_back(path: Path) -> dict[str, torch.Tensor]:
    """The file as someone without shardadam reads it."""
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    return torch.load(path, weights_only=True)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "model.bin"])
def test_exported_weights_are_the_trained_state_dict(tmp_path, name):
    model, opt = trained()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint.save(tmp_path / "ckpt", model=model, optimizer=opt)
    out = export.export_weights(tmp_path / "ckpt", tmp_path / name)
    assert out == tmp_path / name
    got = read_back(out)
    assert_same_tensors(got, want)  # buffers too: running statistics and the batch counter
    assert got["head.weight"].data_ptr() != got["embed.weight"].data_ptr()  # each key its own

    fresh = TiedModel()
    fresh.load_state_dict(got, strict=True)
    ids = torch.arange(VOCAB)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(ids), model(ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exported_ema_is_the_optimizers_ema(tmp_path, dtype):
    model, opt = trained(dtype)
    checkpoint.save(tmp_path, model=model, optimizer=opt)
    with opt.swap_moving_averages():
        swapped = export.plain_state_dict(model)
    got = read_back(export.export_weights(tmp_path, tmp_path / "ema.safetensors", ema=True))
    assert_same_tensors(got, swapped)
    for name, param in [("embed.weight", model.embed.weight), ("norm.bias", model.norm.bias)]:
        assert torch.equal(got[name], opt.moving_average(param).to(dtype)), name
        assert not torch.equal(got[name], param.detach()), f"{name}: the EMA is the weights"
    for name in ["frozen.weight", "norm.running_mean", "norm.num_batches_tracked"]:
        assert torch.equal(got[name], model.state_dict()[name]), name  # no EMA: as saved
    fresh = TiedModel().to(dtype)
    fresh.load_state_dict(got, strict=True)
    assert torch.equal(fresh.head.weight, got["head.weight"])


def test_a_root_exports_its_latest_checkpoint(tmp_path):
    model, opt = trained(steps=1)
    checkpoint.save(tmp_path, model=model, optimizer=opt, step=1)
    model, opt = trained(steps=2)
    checkpoint.save(tmp_path, model=model, optimizer=opt, step=2)
    got = read_back(export.export_weights(tmp_path, tmp_path / "w.pt"))
    assert_same_tensors(got, dict(model.state_dict()))


DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


def test_own_safetensors_writer_is_read_by_safetensors(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(DTYPES):
        values = torch.randn(3, i + 1, generator=generator) * 100
        if dtype == torch.complex64:
            values = torch.complex(values, -values)
        tensors[f"t.{dtype}"] = values.to(dtype)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    tensors["empty"] = torch.zeros(0, 4, dtype=torch.float16)
    tensors["a view"] = torch.arange(20.0).view(4, 5)[1:, ::2]  # copied, not its storage
    monkeypatch.setitem(sys.modules, "safetensors", None)  # writing needs no safetensors
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    out = export.save_weights(tensors, tmp_path / "all.safetensors")
    monkeypatch.undo()
    assert_same_tensors(safetensors.torch.load_file(out), tensors)
    with safetensors.safe_open(out, framework="pt") as file:
        assert file.metadata() == {"format": "pt"}  # transformers' from_pretrained wants it
    header_nbytes = int.from_bytes(out.read_bytes()[:8], "little")
    assert header_nbytes % 8 == 0


def test_plain_state_dict_of_a_head_holds_the_head_only(tmp_path):
    """The head's parameters are views into ShardedAdam's flat buffer (4 MB of body)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(64, 64))
    opt = ShardedAdam(model.parameters(), jit_compile=False)
    head = model[1]
    head_nbytes = sum(t.numel() * t.element_size() for t in head.state_dict().values())
    assert head_nbytes < 17_000

    def saved_nbytes(state_dict) -> int:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        return buffer.getbuffer().nbytes

    assert saved_nbytes(head.state_dict()) > 4_000_000  # the whole flat buffer
    plain = export.plain_state_dict(head)
    assert saved_nbytes(plain) < head_nbytes + 4_000
    assert_same_tensors(plain, {k: v.detach() for k, v in head.state_dict().items()})
    safetensors.torch.save_file(plain, tmp_path / "head.safetensors")  # views it would refuse
    with torch.no_grad():
        head.weight.add_(1.0)
    assert not torch.equal(plain["weight"], head.weight)  # a copy, not the live tensor
    assert opt.param_groups  # the optimizer, and so its buffer, lived through the test


def test_the_command_line_writes_the_file(tmp_path, capsys):
    model, opt = trained(steps=2)
    checkpoint.save(tmp_path / "ckpt", model=model, optimizer=opt)
    out = tmp_path / "weights.data"
    args = [str(tmp_path / "ckpt"), "--out", str(out), "--ema", "--format", "torch"]
    assert export.main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with opt.swap_moving_averages():
        assert_same_tensors(torch.load(out, weights_only=True), export.plain_state_dict(model))

    with pytest.raises(SystemExit) as exited:
        export.main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "w.npz")])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "Invalid out" in error and ".safetensors, .pt, .pth, .bin" in error
    assert not (tmp_path / "w.npz").exists()


def test_python_dash_m_runs(tmp_path):
    model, opt = trained(steps=1)
    checkpoint.save(tmp_path / "ckpt", model=model, optimizer=opt)
    out = tmp_path / "m.safetensors"
    command = [sys.executable, "-m", "shardadam.export", str(tmp_path / "ckpt"), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).parents[2])
    assert_same_tensors(safetensors.torch.load_file(out), dict(model.state_dict()))


def refused_and_unchanged(out: Path, error, match, call) -> None:
    """``call`` raises and leaves ``out`` (an earlier file) and its directory as they were."""
    out.write_bytes(b"earlier file")
    before = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(error, match=match):
        call()
    assert out.read_bytes() == b"earlier file"
    assert sorted(p.name for p in out.parent.iterdir()) == before


def test_refusals_name_the_argument_and_change_nothing(tmp_path):
    model, opt = trained(steps=1, use_ema=False)
    checkpoint.save(tmp_path / "plain", model=model, optimizer=opt)
    checkpoint.save(tmp_path / "optimizer-only", optimizer=opt)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "w.safetensors"
    plain, weights = tmp_path / "plain", export.export_weights
    complex128 = {"c": torch.zeros(2, dtype=torch.complex128)}
    cases = [
        (CheckpointError, "holds no EMA", lambda: weights(plain, out, ema=True)),
        (CheckpointError, "holds no model", lambda: weights(tmp_path / "optimizer-only", out)),
        (FileNotFoundError, "does not exist", lambda: weights(tmp_path / "nowhere", out)),
        (ValueError, r"Invalid format: 'onnx' \(expected one of safetensors, torch\)",
         lambda: weights(plain, out, format="onnx")),
        (TypeError, "ema must be True or False", lambda: weights(plain, out, ema="yes")),
        (TypeError, "dtype torch.complex128, which safetensors does not store",
         lambda: export.save_weights(complex128, out)),
        (TypeError, "entry 'n' is a int", lambda: export.save_weights({"n": 3}, out)),
    ]  # fmt: skip
    for error, match, call in cases:
        refused_and_unchanged(out, error, match, call)
    with pytest.raises(ValueError, match=r"Invalid out: .*'\.txt'; expected one of \.safetensors"):
        export.export_weights(tmp_path / "plain", out_dir / "w.txt")
    with pytest.raises(FileNotFoundError, match="its directory does not exist"):
        export.export_weights(tmp_path / "plain", tmp_path / "no-dir" / "w.pt")


def test_a_write_that_fails_midway_leaves_the_earlier_file(tmp_path, monkeypatch):
    model, opt = trained(steps=1)
    checkpoint.save(tmp_path / "ckpt", model=model, optimizer=opt)
    out = tmp_path / "w.safetensors"
    written = []

    def fail_on_the_third(tensor):
        if len(written) == 2:
            raise OSError("No space left on device")
        written.append(tensor)
        return tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy()

    monkeypatch.setattr(export, "raw_bytes", fail_on_the_third)
    refused_and_unchanged(
        out, OSError, "No space left", lambda: export.export_weights(tmp_path / "ckpt", out)
    )
