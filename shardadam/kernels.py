"""Running the per-shard update: compiled with torch.compile, or eagerly as the fallback.

Each combination of present optional tensors, dtypes and device type gets its own compiled
copy of the update function, so that one optimizer's variants never evict another's from
dynamo's per-function recompile budget, and a new shard size never recompiles (dynamic shapes).
What the first compiled step spends besides importing the compiler is cut down where it need
not recur in every process: Note [vec ISA probes], Note [no precompiled header].
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import socket
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
        if isinstance(arg, (tuple, list)):  # a rule's slots, or its structure
            return tuple(describe(a) for a in arg)
        if isinstance(arg, types.ModuleType):  # an update rule
            return arg.__name__
        if arg is None or isinstance(arg, (bool, int, float, str)):
            return (type(arg).__name__, arg)
        return type(arg).__qualname__

    return (fn.__qualname__, tuple(describe(a) for a in args))


def _copy_function(fn: Callable, suffix: int) -> Callable:
    # A distinct code object gets its own dynamo cache entry and recompile budget.
    code = fn.__code__.replace(co_name=f"{fn.__name__}_variant{suffix}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


# Note [vec ISA probes]
#     Measured with torch 2.13, CPU, warm caches (benchmarks/first_step.py): to pick the
#     vector ISA, inductor builds one small library per ISA the CPU claims (cached on disk)
#     and dlopens each in a new Python subprocess (not cached), in every process: ten
#     subprocesses on an AVX-512/AMX machine, 1.33 s of a 2.81 s warm first step (2.25 s of
#     4.52 s on a busy machine), on every rank. A load that succeeded is recorded next to the
#     library, stamped with what it depends on (the library file, torch's own libraries, this
#     Python, the host), so that a later process skips the probe of that same library; a
#     failed or hung load is not recorded and is probed again, as inductor does. The runner
#     installs this when it is made, so that the user's own compiled code benefits too (the
#     ISA is picked once per process, by whichever compilation comes first). Where inductor
#     has no ``VecISA._probe_load`` (other torch versions) nothing changes.

_PROBE_RECORD_SUFFIX = ".loads"


def _remember_vec_isa_probes() -> None:
    """Record inductor's successful ISA probes across processes (Note [vec ISA probes])."""
    try:
        from torch._inductor import cpu_vec_isa
    except ImportError:
        return
    probe = getattr(cpu_vec_isa.VecISA, "_probe_load", None)
    if probe is not None and not getattr(probe, "_shardadam_remembers", False):
        cpu_vec_isa.VecISA._probe_load = _remembering(probe)


def _remembering(probe: Callable[[object, str], bool]) -> Callable[[object, str], bool]:
    @functools.wraps(probe)
    def probe_load(isa: object, library_path: str) -> bool:
        stamp = _probe_stamp(library_path)
        record = library_path + _PROBE_RECORD_SUFFIX
        try:
            with open(record) as file:
                if stamp and file.read() == stamp:
                    return True
        except OSError:
            pass
        loaded = probe(isa, library_path)
        if loaded and stamp:
            _write_replacing(record, stamp)
        return loaded

    probe_load._shardadam_remembers = True  # type: ignore[attr-defined]
    return probe_load


def _probe_stamp(library_path: str) -> str:
    """What a probe's success depends on; empty where a file cannot be read."""
    try:
        library = os.stat(library_path)
    except OSError:
        return ""
    runtime = _runtime_stamp()
    return runtime and repr((library_path, library.st_size, library.st_mtime_ns, runtime))


@functools.cache
def _runtime_stamp() -> str:
    """torch's own libraries (a probe's library links to them), the Python, the host."""
    torch_libs = os.path.join(os.path.dirname(torch.__file__), "lib")
    try:
        names = [n for n in sorted(os.listdir(torch_libs)) if n.startswith(("libtorch", "libc10"))]
        files = [(n, os.stat(os.path.join(torch_libs, n)).st_mtime_ns) for n in names]
    except OSError:
        return ""
    host = (socket.gethostname(), _cpu_identity())
    return repr((torch_libs, files, torch.__version__, sys.executable, host))


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags: a cache directory shared by machines of one
    name but another CPU (containers, a shared file system) must not take this one's probes,
    whose instructions that CPU may lack."""
    try:
        with open("/proc/cpuinfo") as file:
            lines = [line for line in file if line.startswith(("model name", "flags"))]
    except OSError:
        return platform.processor() or platform.machine()
    return "".join(sorted(set(lines)))


def _write_replacing(path: str, text: str) -> None:
    # Ranks of one machine may write the same record at once: each writes a file of its own
    # and renames it, so that no rank reads a record half written.
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        with open(partial, "w") as file:
            file.write(text)
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(partial)


# Note [no precompiled header]
#     Measured with torch 2.13, CPU: with inductor's default cpp_cache_precompile_headers,
#     loading a cached kernel in a new process first preprocesses cpp_prefix.h (g++ -E, then
#     openssl for a hash: 0.15-0.25 s) to name a precompiled header that only a build of the
#     kernel would use. Without it a warm first step is that much shorter, in every process
#     and on every rank; a cold one (one kernel) takes 24 s instead of 21 s where the header
#     was already built, and 21 s instead of 31 s on a machine where it was not (building it
#     takes 10 s). The kernel's code and compiler flags are the same.


def compile_function(fn: Callable) -> Callable:
    """torch.compile with the settings the update needs; tests replace this to simulate failure."""
    return torch.compile(fn, dynamic=True, fullgraph=True, options=_inductor_options())


def _inductor_options() -> dict[str, object]:
    import torch._inductor.config

    if hasattr(torch._inductor.config, "cpp_cache_precompile_headers"):
        return {"cpp_cache_precompile_headers": False}  # Note [no precompiled header]
    return {}


class UpdateRunner:
    """Calls update functions compiled (``jit_compile=True``) or eagerly.

    If compilation fails, warns once and runs eagerly from then on; results are the same.
    """

    def __init__(self, jit_compile: bool, announce: bool = True, owner: str = "shardadam") -> None:
        """``announce``: say (INFO, logger ``shardadam``, once per process) when the first
        update compiles, which takes seconds; one rank of a group says it. ``owner``: the
        optimizer's class name, for the messages."""
        self.announce = announce
        self.owner = owner
        self.jit_compile = jit_compile and compile_available()
        if jit_compile and not self.jit_compile:
            warnings.warn(
                "jit_compile=True but torch.compile is not supported in this Python; "
                f"{owner} runs its update eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.jit_compile:
            _remember_vec_isa_probes()  # before any compilation, the user's own too

    def __call__(self, fused: Callable, eager: Callable, *args: object) -> object:
        """``fused(*args)`` compiled, or ``eager(*args)``: two formulations of the same math."""
        if self.jit_compile:
            key = _variant_key(fused, args)
            compiled = _compiled_variants.get(key)
            if compiled is None:
                if not _compiled_variants and self.announce:
                    _announce(
                        f"{self.owner}: compiling the update with torch.compile (the first step "
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
                    f"{first_line}); {self.owner} runs its update eagerly from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return eager(*args)
