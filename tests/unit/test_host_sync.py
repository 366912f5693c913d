"""No host sync in the steady-state step (Note [no host sync in the step] in ``functional``).

On CUDA, Python reading a device tensor's value waits for the GPU. Here (CPU) every tensor is
on the host, so the check is by call site: while ``step()`` runs, every Tensor method that
reads values into Python (``.item()``, ``.tolist()``, ``bool``, ``float``, ``int``...) records
its caller, and only the documented sites, which read host memory, may appear.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch.overrides import TorchFunctionMode

from shardadam import ShardedAdam, schedules
from shardadam.clipping import GradClipper

READ_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
SYNC_METHODS = ("cpu", "numpy", "nonzero")
"""Not reads by Python, but a device sync all the same (nonzero: a size that depends on the
values)."""


class Read(NamedTuple):
    method: str
    caller: str
    """The function that called ``method``, as ``file.py:function``."""
    device: str


EAGER_KERNEL_FLOATS = Read("tolist", "functional.py:shard_step_inplace_", "cpu")
"""The eager kernel's Python floats, from the host copy of the packed scalars."""
SCHEDULE_VALUE = Read("__float__", "optimizer.py:_group_learning_rate", "cpu")
"""A schedule's learning rate, a CPU tensor (shardadam.schedules return those)."""
ALLOWED_IN_ONE_PROCESS = {EAGER_KERNEL_FLOATS, SCHEDULE_VALUE}


@contextlib.contextmanager
def host_reads() -> Iterator[list[Read]]:
    """Record every call of READ_METHODS and SYNC_METHODS (and ``torch.nonzero``) inside."""
    reads: list[Read] = []

    def recording(name: str, original):
        @functools.wraps(original)
        def recorded(tensor, *args, **kwargs):
            code = sys._getframe(1).f_code
            where = f"{Path(code.co_filename).name}:{code.co_name}"
            reads.append(Read(name, where, tensor.device.type))
            return original(tensor, *args, **kwargs)

        return recorded

    patched = [(torch.Tensor, name) for name in READ_METHODS + SYNC_METHODS]
    patched.append((torch, "nonzero"))
    originals = [(owner, name, getattr(owner, name)) for owner, name in patched]
    try:
        for owner, name, original in originals:
            setattr(owner, name, recording(name, original))
        yield reads
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def forbidden(reads: list[Read], allowed: set[Read]) -> list[Read]:
    return sorted(set(reads) - allowed)


class Net(torch.nn.Module):
    """fp32 layers with a frozen bias (a gradient mask) and a bf16 scale (an fp32 master)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 8)
        self.body.bias.requires_grad_(False)
        self.head = torch.nn.Linear(8, 3)
        self.scale = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x))) * self.scale.float()


COMMON = {"weight_decay": 0.05, "use_ema": True, "ema_overwrite_frequency": 2}
CONFIGS = {
    "global_clipnorm": {"learning_rate": 0.01, "global_clipnorm": 0.05, **COMMON},
    "clipnorm+clipvalue+schedule": {
        "learning_rate": schedules.ExponentialDecay(0.01, 10, 0.9),
        "per_group": ({"clipnorm": 0.05}, {"clipvalue": 0.01}),
        **COMMON,
    },
}
WATCHED_STEPS = 3  # after one warm-up step (the first compile, masks and their ranges)


def make_optimizer(model: Net, config: dict, jit_compile: bool) -> ShardedAdam:
    kwargs = dict(config)
    per_group = kwargs.pop("per_group", ({}, {}))
    named = list(model.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named if n != "scale"], **per_group[0]},
        {"params": [(n, p) for n, p in named if n == "scale"], **per_group[1]},
    ]
    opt = ShardedAdam(groups, jit_compile=jit_compile, **kwargs)
    opt.exclude_from_weight_decay(var_names=["bias"])
    return opt


def loss_at(model: Net, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    return (model(x) - y).square().mean()


@functools.cache
def train(config_name: str, jit_compile: bool) -> tuple[list[Read], list[torch.Tensor]]:
    """(the reads of the watched steps, the parameters after them)."""
    model = Net()
    opt = make_optimizer(model, CONFIGS[config_name], jit_compile)
    reads: list[Read] = []
    for step in range(1 + WATCHED_STEPS):
        loss_at(model, step).backward()
        with host_reads() if step else contextlib.nullcontext([]) as step_reads:
            opt.step()
        reads += step_reads
        opt.zero_grad()
    return reads, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("jit_compile", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_a_steady_state_step_reads_no_tensor_outside_the_documented_sites(config_name, jit_compile):
    reads, _ = train(config_name, jit_compile)
    assert forbidden(reads, ALLOWED_IN_ONE_PROCESS) == []
    # The check sees the reads it allows: the eager kernel's floats, a schedule's value.
    assert (EAGER_KERNEL_FLOATS in reads) == (not jit_compile)
    assert (SCHEDULE_VALUE in reads) == ("schedule" in config_name)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_the_eager_step_without_reads_gives_the_compiled_numbers(config_name):
    _, compiled = train(config_name, True)
    _, eager = train(config_name, False)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_check_catches_a_read_added_to_the_step(monkeypatch):
    record = GradClipper.record_grad_norm

    def record_and_read(self, local_sq):
        record(self, local_sq)
        self.last_grad_norm.item()

    monkeypatch.setattr(GradClipper, "record_grad_norm", record_and_read)
    model = Net()
    opt = make_optimizer(model, CONFIGS["global_clipnorm"], jit_compile=False)
    for step in range(2):
        loss_at(model, step).backward()
        with host_reads() if step else contextlib.nullcontext([]) as reads:
            opt.step()
        opt.zero_grad()
    assert forbidden(reads, ALLOWED_IN_ONE_PROCESS) == [
        Read("item", "test_host_sync.py:record_and_read", "cpu")
    ]


class TorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def test_one_process_agrees_on_gradients_without_tensors():
    model = Net()
    opt = make_optimizer(model, CONFIGS["global_clipnorm"], jit_compile=False)
    loss_at(model, 0).backward()
    opt._reducer.collect()
    with TorchCalls() as seen:
        present, late, failed = opt._reducer.agree(False)
    assert seen.calls == []
    assert present == [[0, 2, 3], [0]]  # the frozen bias has none
    assert (late, failed) == ([False, False], 0)
