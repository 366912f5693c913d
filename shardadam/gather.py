"""The parameter gather: every rank's updated shards back to every rank, optionally left in
flight so that the next forward overlaps it.

Note [gather during forward]
    With ``overlap`` (overlap_param_gather=True, at the end of step()) the gathers are left in
    flight, and nothing may read a parameter of a bucket still arriving. While any gather is in
    flight three guards wait first; all three go away once every bucket has arrived:
    - a global module forward pre-hook waits for the buckets of the module's own parameters:
      the fast path, by which the forward of the first layers runs while later ones arrive;
    - a torch-function mode, ``_ReadGuard``, waits for the bucket of every tensor argument of
      any torch function or Tensor method that lies in a bucket in flight (found by address,
      so views and detached aliases count; metadata such as ``.shape`` or ``.grad`` does not
      wait): a tied head reading another module's weight, a parameter read outside any
      forward (``p.norm()``, ``state_dict()``, ``print``, ``load_state_dict``). It sits at the
      bottom of this thread's mode stack (above the context of ``torch.set_default_device``,
      which must be lowest), so the modes the user enters and exits meanwhile (``with
      torch.device(...)`` pops whatever is on top) keep their order, and it is taken out from
      wherever it is (not from inside its own ``__torch_function__``, where it is off the
      stack: then by the next hook call or wait);
    - compiled code, which runs neither: Note [gather and torch.compile].
    The optimizer's own methods wait for everything first (``wait``). A wait is the
    collective's ``work.wait()``: on CUDA the current stream waits for it (no host sync).
    Modes are per thread: reads from a thread other than the one calling step() are guarded
    by the hook only. Backward's recomputations (activation checkpointing, on CUDA in the
    autograd thread) read only parameters their forward already waited for.

Note [gather and torch.compile]
    Measured with torch 2.13. Dynamo does not guard on global module hooks: a frame compiled
    before the hook was registered runs without it, reading whatever the buffers hold. It does
    guard on the torch-function mode stack, so a compiled frame called while ``_ReadGuard`` is
    on the stack is traced anew, with the mode and the hook. Traced, the hook calls
    ``_wait_in_compiled_code`` (excluded from compilation): a graph break at the first module
    call of the frame, where at run time every gather is waited for and the mode is removed,
    so the rest of the frame is traced as one graph without it. A compiled model thus costs a
    second compilation and one graph break per call after a step, and overlaps the gather
    only with what runs before the compiled call; with fullgraph=True dynamo refuses the graph
    break, quoting the reason given there. Waiting inside the mode's ``__torch_function__``
    when traced is no option: a graph break there is mishandled (a resume function called
    ``linear`` with the wrong arguments), and an exception raised there became a graph break
    after which the read ran on stale values. So a traced read of a parameter in flight
    before any module call (a compiled function reading ``model.w`` itself, or given it as an
    argument) is refused while tracing, on every rank alike, through
    ``torch.compiler.assume_constant_result``: the one way found for an error to reach the
    caller. ``torch.compile(model)`` is seen eagerly: the hook waits for everything on its
    ``OptimizedModule`` wrapper, before the compiled call, which then runs the first graph.
"""

from __future__ import annotations

import bisect
import sys
import threading
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import comm
from .buffers import FlatBuffer

_in_flight: list[ParamGather] = []
"""The gathers with buckets in flight, in any thread (Note [gather during forward])."""
_guards: dict[int, _ReadGuard] = {}
"""Thread id -> the ``_ReadGuard`` on that thread's mode stack."""
_hook: Any = None
"""The global forward pre-hook's handle, while a gather is in flight or a guard is left."""

_METADATA = frozenset(
    [getattr(torch.Tensor, name).__get__ for name in (
        "shape", "dtype", "device", "layout", "grad", "requires_grad", "is_leaf", "grad_fn",
        "ndim", "is_cuda", "is_sparse", "is_meta", "nbytes", "itemsize", "_base",
    )]
    + [torch.Tensor.grad.__set__, torch.Tensor.requires_grad.__set__]
    + [getattr(torch.Tensor, name) for name in (
        "size", "dim", "numel", "nelement", "stride", "data_ptr", "element_size",
        "is_contiguous", "is_floating_point", "is_complex", "get_device", "requires_grad_",
        "register_hook", "register_post_accumulate_grad_hook", "__len__",
    )]
)  # fmt: skip
"""Functions that read a tensor's metadata, not its values: no need to wait for those."""


class ParamGather:
    """The all-gathers of a list of flat buffers, and the waits for those left in flight.

    ``buffers`` and ``position_of`` (id(parameter) -> (buffer index, index in the buffer)) are
    the optimizer's own, read at each call: buffers added later are gathered too.
    """

    def __init__(
        self,
        communicator: comm.Communicator,
        buffers: list[FlatBuffer],
        position_of: dict[int, tuple[int, int]],
    ) -> None:
        self.comm = communicator
        self.buffers = buffers
        self.position_of = position_of
        self._pending: list[comm.Pending | None] = []
        self.bucket_in_flight: list[bool] = []
        """Per buffer, whether its gather is in flight (read by traced code: plain bools)."""
        self._starts: list[int] = []
        self._spans: list[tuple[int, int, int]] = []
        """(first byte, end byte, buffer) of the buffers in flight, by address."""

    @property
    def in_flight(self) -> bool:
        return bool(self._pending)

    def gather(self, overlap: bool = False) -> None:
        """Collective: every rank's shards reach every rank (all buckets in flight at once);
        with ``overlap`` the gathers are left in flight (Note [gather during forward])."""
        self.wait()
        pending = [self.comm.start_all_gather(b.flat_param) for b in self.buffers]
        if not overlap or not self.comm.active:
            for gather in pending:
                gather.wait()
            return
        self._pending = pending
        self.bucket_in_flight = [True] * len(pending)
        self._spans = sorted(
            (ptr, ptr + b.flat_param.numel() * b.flat_param.element_size(), index)
            for index, b in enumerate(self.buffers)
            for ptr in [b.flat_param.data_ptr()]
        )
        self._starts = [start for start, _, _ in self._spans]
        _arm(self)

    def wait(self, params: Iterable[Tensor] | None = None) -> None:
        """Wait until the parameters (all, or ``params``) hold their gathered values."""
        if not self._pending:
            _release_guards()  # one left on the stack by a wait inside it
            return
        if params is None:
            wanted: Iterable[int] = range(len(self.buffers))
        else:
            wanted = {self.position_of[id(p)][0] for p in params if id(p) in self.position_of}
        for b in wanted:
            self._wait_bucket(b)

    def wait_for_address(self, ptr: int) -> None:
        """Wait for the buffer holding the byte at ``ptr``, if one in flight does."""
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i >= 0:
            start, end, b = self._spans[i]
            if ptr < end:
                self._wait_bucket(b)

    def _wait_bucket(self, b: int) -> None:
        gather = self._pending[b] if b < len(self._pending) else None
        if gather is None:
            return
        self._pending[b] = None  # first: a read inside the wait must not wait again
        self.bucket_in_flight[b] = False
        gather.wait()
        if not any(self.bucket_in_flight):
            self._pending = []
            self._spans, self._starts = [], []
            _in_flight.remove(self)
            _release_guards()

    def is_in_flight(self, param: Tensor) -> bool:
        """Whether the gather of ``param``'s buffer is in flight (a parameter of a group
        added since the gather started is not)."""
        b = self.position_of.get(id(param), (len(self.bucket_in_flight), 0))[0]
        return b < len(self.bucket_in_flight) and self.bucket_in_flight[b]

    def param_name(self, param: Tensor) -> str:
        b, index = self.position_of[id(param)]
        return self.buffers[b].layout.params[index].name


class _ReadGuard(TorchFunctionMode):
    """Waits for the bucket of every tensor argument in flight (Note [gather during forward])."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if _in_flight and func not in _METADATA:
            if torch.compiler.is_compiling():
                _check_traced_reads(args, kwargs)
            else:
                _wait_for_arguments(args)
                if kwargs:
                    _wait_for_arguments(kwargs.values())
        return func(*args, **kwargs)


def _wait_for_arguments(values: Iterable[Any]) -> None:
    for value in values:
        if isinstance(value, Tensor):
            try:
                ptr = value.data_ptr()
            except RuntimeError:  # no storage: a fake, functional or batched tensor
                continue
            for gather in tuple(_in_flight):
                gather.wait_for_address(ptr)
        elif isinstance(value, (list, tuple)):
            _wait_for_arguments(value)


def _check_traced_reads(args: tuple, kwargs: dict) -> None:
    # Traced by dynamo (Note [gather and torch.compile]): nothing here runs at run time.
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            _check_traced_reads(tuple(value), {})
        elif isinstance(value, torch.nn.Parameter):
            for gather in _in_flight:
                if gather.is_in_flight(value):
                    _refuse_traced_read(
                        gather.param_name(value), gather.comm.rank, gather.comm.world_size
                    )


def _raise_traced_read(name: str, rank: int, world_size: int) -> bool:
    # Called for real while dynamo traces: the one way found to raise to the caller.
    raise RuntimeError(
        f"rank {rank}/{world_size}: overlap_param_gather=True cannot let compiled code read "
        f"parameter '{name}' while its all-gather is in flight: torch.compile traced a read of "
        "it before any module's forward in the compiled function, where compiled code cannot "
        "wait; call opt.wait_for_params() before the compiled call, read parameters inside a "
        "module's forward, or build the optimizer with overlap_param_gather=False"
    )


def _wait_for_everything() -> None:
    for gather in tuple(_in_flight):
        gather.wait()
    _release_guards()


# What compiled code calls (Note [gather and torch.compile]). Wrapping a function for dynamo
# imports it (about a second), so they are made when the first gather is armed, before any
# compiled code can see a gather in flight.
_refuse_traced_read: Any = None
_wait_in_compiled_code: Any = None


def _make_compiled_code_hooks() -> None:
    global _refuse_traced_read, _wait_in_compiled_code
    if _wait_in_compiled_code is not None:
        return
    _refuse_traced_read = torch.compiler.assume_constant_result(_raise_traced_read)
    _wait_in_compiled_code = torch.compiler.disable(
        _wait_for_everything,
        reason=(
            "overlap_param_gather=True: compiled code waits here for the parameter all-gathers "
            "in flight (a graph break at the first module call after step()); with "
            "fullgraph=True call opt.wait_for_params() before the compiled call, or build the "
            "optimizer with overlap_param_gather=False"
        ),
    )


def _forward_pre_hook(module: torch.nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():
        _wait_in_compiled_code()  # Note [gather and torch.compile]
        return
    if not _in_flight:
        _release_guards(outside_guard=True)  # no module runs inside the guard
        return
    if _is_compiled_wrapper(module):
        _wait_for_everything()
        return
    # Note [gather during forward]: wait for the buckets of this module's own parameters.
    for gather in tuple(_in_flight):
        gather.wait(module._parameters.values())


def _is_compiled_wrapper(module: torch.nn.Module) -> bool:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def _arm(gather: ParamGather) -> None:
    global _hook
    _make_compiled_code_hooks()
    if gather not in _in_flight:
        _in_flight.append(gather)
    thread = threading.get_ident()
    if not _on_stack(_guards.get(thread)):  # not yet, or taken off by someone else
        _guards[thread] = _ReadGuard()
        _push_lowest(_guards[thread])
    if _hook is None:
        _hook = torch.nn.modules.module.register_module_forward_pre_hook(_forward_pre_hook)


def _release_guards(outside_guard: bool = False) -> None:
    """Take this thread's guard off its mode stack, and the hook once no guard is left.

    A guard is off the stack while its own ``__torch_function__`` runs, and then stays until
    a later call; ``outside_guard`` says that this is not the case, so a guard off the stack
    was taken off by someone else.
    """
    global _hook
    if _in_flight:
        return
    thread = threading.get_ident()
    guard = _guards.get(thread)
    if guard is not None and (_remove_mode(guard) or outside_guard):
        del _guards[thread]
    if not _guards and _hook is not None:
        _hook.remove()
        _hook = None


def _push_lowest(mode: TorchFunctionMode) -> None:
    # At the bottom, so that the user's modes pushed later stay above it and pop themselves
    # (``with torch.device(...)`` pops whatever is on top at its exit); but above the context
    # of torch.set_default_device, which insists on being lowest.
    stack = [torch._C._pop_torch_function_stack() for _ in range(_mode_stack_depth())]
    stack.reverse()
    default_device = getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None)
    below = 1 if stack and stack[0] is default_device else 0
    for other in [*stack[:below], mode, *stack[below:]]:
        torch._C._push_on_torch_function_stack(other)


def _on_stack(mode: TorchFunctionMode | None) -> bool:
    stack = (torch._C._get_function_stack_at(i) for i in range(_mode_stack_depth()))
    return mode is not None and any(m is mode for m in stack)


def _remove_mode(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` off this thread's stack wherever it is; False where it is not on it."""
    if not _on_stack(mode):
        return False
    above = []
    while True:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)
    return True


def _mode_stack_depth() -> int:
    return torch._C._len_torch_function_stack()
