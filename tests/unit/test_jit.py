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
