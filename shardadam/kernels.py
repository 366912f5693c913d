"""Running the per-shard update: compiled with torch.compile, or eagerly as the fallback.

Each combination of present optional tensors, dtypes and device type gets its own compiled
copy of the update function, so that one optimizer's variants never evict another's from
dynamo's per-function recompile budget, and a new shard size never recompiles (dynamic shapes).
"""

from __future__ import annotations

import functools
import logging
import sys
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

_compiled_variants: dict[tuple, Callable] = {}
_LOG = logging.getLogger("shardadam")

# torch._dynamo and torch._inductor take about a second to import: only a compiled update
# needs them, so they are imported at its first use, not with shardadam.


@functools.cache
def _compile_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this function cannot be compiled here"; they are raised before any
    input is mutated, so the eager rerun starts from the same state."""
    import torch._dynamo
    import torch._inductor

    errors: tuple[type[BaseException], ...] = (torch._dynamo.exc.TorchDynamoException,)
    if hasattr(torch._inductor, "exc"):
        errors += (torch._inductor.exc.InductorError, torch._inductor.exc.CppCompileError)
    return errors


def _announce(message: str) -> None:
    """INFO on logger ``shardadam`` where logging is set up, else one line on stderr: the user
    should know why the first step takes seconds."""
    if _LOG.hasHandlers():
        _LOG.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def compile_available() -> bool:
    """Whether torch.compile works in this Python (it does not on every version)."""
    import torch._dynamo

    return torch._dynamo.is_dynamo_supported()


def _variant_key(fn: Callable, args: tuple) -> tuple:
    def describe(arg: object) -> object:
        if isinstance(arg, Tensor):
            return (arg.dtype, arg.device.type)
        return arg is None

    return (fn.__qualname__, tuple(describe(a) for a in args))


def _copy_function(fn: Callable, suffix: int) -> Callable:
    # A distinct code object gets its own dynamo cache entry and recompile budget.
    code = fn.__code__.replace(co_name=f"{fn.__name__}_variant{suffix}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def compile_function(fn: Callable) -> Callable:
    """torch.compile with the settings the update needs; tests replace this to simulate failure."""
    return torch.compile(fn, dynamic=True, fullgraph=True)


class UpdateRunner:
    """Calls update functions compiled (``jit_compile=True``) or eagerly.

    If compilation fails, warns once and runs eagerly from then on; results are the same.
    """

    def __init__(self, jit_compile: bool, announce: bool = True) -> None:
        """``announce``: say (INFO, logger ``shardadam``, once per process) when the first
        update compiles, which takes seconds; one rank of a group says it."""
        self.announce = announce
        self.jit_compile = jit_compile and compile_available()
        if jit_compile and not self.jit_compile:
            warnings.warn(
                "jit_compile=True but torch.compile is not supported in this Python; "
                "ShardedAdam runs its update eagerly",
                RuntimeWarning,
                stacklevel=3,
            )

    def __call__(self, fused: Callable, eager: Callable, *args: object) -> object:
        """``fused(*args)`` compiled, or ``eager(*args)``: two formulations of the same math."""
        if self.jit_compile:
            key = _variant_key(fused, args)
            compiled = _compiled_variants.get(key)
            if compiled is None:
                if not _compiled_variants and self.announce:
                    _announce(
                        "ShardedAdam: compiling the update with torch.compile (the first step "
                        "takes seconds; jit_compile=False runs it eagerly)"
                    )
                compiled = compile_function(_copy_function(fused, len(_compiled_variants)))
                _compiled_variants[key] = compiled
            try:
                return compiled(*args)
            except _compile_errors() as error:
                _compiled_variants.pop(key, None)
                self.jit_compile = False
                first_line = (str(error).strip().splitlines() or [""])[0]
                warnings.warn(
                    f"jit_compile=True but torch.compile failed ({type(error).__name__}: "
                    f"{first_line}); ShardedAdam runs its update eagerly from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return eager(*args)
