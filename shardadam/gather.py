"""The parameter gather: every rank's updated shards back to every rank, optionally left in
flight so that the next forward overlaps it.

Note [gather during forward]
    With ``overlap`` (overlap_param_gather=True, at the end of step()) the gathers are left in
    flight; a global module forward pre-hook waits for the buckets of each module's own
    parameters, so the next forward starts while later layers' parameters are still arriving,
    and every method of the optimizer that reads parameters waits for all of them first
    (``wait``).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import comm
from .buffers import FlatBuffer


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
        self._forward_hook: Any = None

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
        if self._forward_hook is None:
            self._forward_hook = torch.nn.modules.module.register_module_forward_pre_hook(
                functools.partial(_forward_pre_hook, weakref.ref(self))
            )

    def wait(self, params: Iterable[Tensor] | None = None) -> None:
        """Wait until the parameters (all, or ``params``) hold their gathered values."""
        if not self._pending:
            return
        if params is None:
            wanted = range(len(self.buffers))
        else:
            wanted = {self.position_of[id(p)][0] for p in params if id(p) in self.position_of}
        for b in wanted:
            if self._pending[b] is not None:
                self._pending[b].wait()
                self._pending[b] = None
        if all(g is None for g in self._pending):
            self._pending = []
            if self._forward_hook is not None:
                self._forward_hook.remove()
                self._forward_hook = None


def _forward_pre_hook(gather_ref: weakref.ref, module: torch.nn.Module, args: Any) -> None:
    # Note [gather during forward]: wait for the buckets of this module's own parameters.
    gather = gather_ref()
    if gather is not None and gather.in_flight:
        gather.wait(module._parameters.values())
