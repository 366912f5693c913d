"""Keras's exponential moving average of the weights, kept sharded like the rest of the state.

Each rank averages the elements it owns (``ShardState.ema``); the step's update kernel advances
it in the same pass as the update. What needs the whole average (``moving_average``,
``finalize_variable_values``, ``swap_moving_averages``) gathers it, one buffer at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from .buffers import FlatBuffer
from .comm import Communicator
from .config import OptimizerOptions
from .functional import ema_shard_step_
from .gather import ParamGather
from .state import ShardState


class ShardedEMA:
    """The EMA's per-step scalars, its advance on accumulation micro-steps, and its readers."""

    def __init__(
        self,
        comm: Communicator,
        buffers: list[FlatBuffer],
        shard_states: list[ShardState],
        param_gather: ParamGather,
        options: OptimizerOptions,
    ) -> None:
        self.comm = comm
        self.buffers, self.shard_states = buffers, shard_states  # the optimizer's lists
        self.param_gather = param_gather
        self.options = options

    def require(self, what: str) -> None:
        if not self.options.use_ema:
            raise RuntimeError(f"{what} needs use_ema=True; this optimizer keeps no EMA")

    def scalars(self, iterations: int) -> tuple[float, bool]:
        """EMA momentum (0 at the first update, as Keras 3) and whether to overwrite now."""
        if not self.options.use_ema:
            return 0.0, False
        momentum = self.options.ema_momentum if iterations != 0 else 0.0
        frequency = self.options.ema_overwrite_frequency
        return momentum, bool(frequency) and (iterations + 1) % frequency == 0

    def advance_only(self, iterations: int) -> bool:
        """Advance the EMA on a step that only accumulates; True if it overwrote parameters."""
        if not self.options.use_ema:
            return False
        ema_momentum, ema_overwrite = self.scalars(iterations)
        for buffer, state in zip(self.buffers, self.shard_states):
            ema_shard_step_(
                buffer.shard_param, state.ema, state.master, ema_momentum, ema_overwrite
            )
        return ema_overwrite

    def full(self, buffer_index: int) -> Tensor:
        """Collective when sharded: the EMA of a whole buffer, flat and padded."""
        buffer = self.buffers[buffer_index]
        ema = self.shard_states[buffer_index].ema
        if not self.comm.active:
            return ema
        full = torch.zeros(buffer.layout.padded_numel, dtype=ema.dtype, device=ema.device)
        full[buffer.shard.slice] = ema
        self.comm.all_gather_(full)
        return full

    def moving_average(self, param: Tensor) -> Tensor:
        """Collective when sharded: the EMA of ``param`` as a new full tensor (compute dtype)."""
        self.require("moving_average()")
        self.param_gather.wait()
        for b, buffer in enumerate(self.buffers):
            for span, p in zip(buffer.layout.params, buffer.params):
                if p is param:
                    return self.full(b)[span.flat.slice].view(span.shape).clone()
        raise ValueError(
            f"moving_average(): the tensor of shape {tuple(param.shape)} is not optimized here"
        )

    def finalize(self, var_list: Iterable[Tensor] | None = None) -> None:
        """Collective when sharded: write the EMA into the parameters (all, or ``var_list``).

        Does nothing without ``use_ema``, as in Keras.
        """
        if not self.options.use_ema:
            return
        self.param_gather.wait()
        wanted = None if var_list is None else {id(p) for p in var_list}
        for buffer, state in zip(self.buffers, self.shard_states):
            chosen = [
                span.index
                for span, p in zip(buffer.layout.params, buffer.params)
                if wanted is None or id(p) in wanted
            ]
            mask = buffer.shard_mask(chosen)
            weights = state.master if state.master is not None else buffer.shard_param
            weights.copy_(torch.where(mask, state.ema.to(weights.dtype), weights))
            if state.master is not None:
                buffer.shard_param.copy_(state.master)
        self.param_gather.gather()

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Collective when sharded: parameters hold their EMA inside the block, then return."""
        self.require("swap_moving_averages()")
        self.param_gather.wait()
        saved = [
            (b.flat_param.clone(), None if s.master is None else s.master.clone())
            for b, s in zip(self.buffers, self.shard_states)
        ]
        self.finalize()
        try:
            yield
        finally:
            for buffer, state, (flat, master) in zip(self.buffers, self.shard_states, saved):
                buffer.flat_param.copy_(flat)
                if master is not None:
                    state.master.copy_(master)
