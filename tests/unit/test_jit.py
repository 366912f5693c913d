"""jit_compile: the compiled update falls back to eager, with a warning, where it cannot run."""

from __future__ import annotations

import pytest
import torch

from shardadam import kernels
from tests.reference import SHAPES, assert_all_close, make_case, run_ours

CASE = make_case(SHAPES, steps=20, seed=31)
KWARGS = {"learning_rate": 0.05, "amsgrad": True, "use_ema": True}


def test_failed_compilation_warns_and_gives_the_eager_numbers(monkeypatch):
    def failing_compile(fn):
        def compiled(*args):
            raise torch._dynamo.exc.TorchDynamoException("simulated: no C++ compiler")

        return compiled

    monkeypatch.setattr(kernels, "compile_function", failing_compile)
    monkeypatch.setattr(kernels, "_compiled_variants", {})
    with pytest.warns(
        RuntimeWarning, match="torch.compile failed .*simulated: no C\\+\\+ compiler"
    ):
        ours, _, opt = run_ours(CASE, {**KWARGS, "jit_compile": True})
    assert opt._runner.jit_compile is False
    eager, _, _ = run_ours(CASE, {**KWARGS, "jit_compile": False})
    assert_all_close(ours, eager, CASE.names)


def test_unsupported_python_warns_at_construction(monkeypatch):
    monkeypatch.setattr(kernels, "compile_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="torch.compile is not supported"):
        runner = kernels.UpdateRunner(jit_compile=True)
    assert runner.jit_compile is False


def test_compiled_and_eager_updates_agree():
    compiled, compiled_avg, _ = run_ours(CASE, {**KWARGS, "jit_compile": True})
    eager, eager_avg, _ = run_ours(CASE, {**KWARGS, "jit_compile": False})
    for a, b in zip(compiled + compiled_avg, eager + eager_avg):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_new_learning_rates_and_shard_sizes_do_not_recompile():
    from torch._dynamo.utils import counters

    from shardadam import ShardedAdam, schedules

    # Two groups (two buffers of different sizes) of one variant, a schedule changing lr.
    groups = [
        {"params": [torch.nn.Parameter(torch.randn(40))]},
        {"params": [torch.nn.Parameter(torch.randn(3, 7))]},
    ]
    opt = ShardedAdam(
        groups, learning_rate=schedules.ExponentialDecay(0.1, 2, 0.5), beta_1=0.85, jit_compile=True
    )
    graphs_before = counters["stats"]["unique_graphs"]
    for _ in range(4):
        for group in groups:
            group["params"][0].grad = torch.randn_like(group["params"][0])
        opt.step()
    assert opt._runner.jit_compile
    assert counters["stats"]["unique_graphs"] - graphs_before <= 1


START_UP = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import torch
import shardadam
from shardadam import train  # the app too
print("after import:", "torch._dynamo" in sys.modules, "torch._inductor" in sys.modules)

def steps(jit_compile):
    param = torch.nn.Parameter(torch.ones(8))
    opt = shardadam.ShardedAdam([param], jit_compile=jit_compile)
    for _ in range(2):
        param.grad = torch.full_like(param, 0.5)
        opt.step()
    return param

eager = steps(False)
compiled = steps(True)
print("same numbers:", torch.allclose(eager, compiled, rtol=1e-6))
"""


def test_the_compiler_is_imported_at_the_first_compiled_update_which_says_so(tmp_path):
    """torch._dynamo and torch._inductor cost about a second to import: `import shardadam`
    (and the app) must not pay it (torch.optim.Optimizer's own add_param_group imports dynamo
    when any torch optimizer is built); the first compiled update says why it takes seconds."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", START_UP], capture_output=True, text=True, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "after import: False False" in done.stdout
    assert "same numbers: True" in done.stdout
    announced = [line for line in done.stderr.splitlines() if "compiling the update" in line]
    assert announced == [
        "shardadam: ShardedAdam: compiling the update with torch.compile (the first step takes "
        "seconds; jit_compile=False runs it eagerly)"
    ]
    # Without any logging set up, the same line goes to stderr.
    done = subprocess.run(
        [sys.executable, "-c", START_UP.replace("logging.basicConfig", "dict")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    announced = [line for line in done.stderr.splitlines() if "compiling the update" in line]
    assert announced == [
        "ShardedAdam: compiling the update with torch.compile (the first step takes seconds; "
        "jit_compile=False runs it eagerly)"
    ]
