"""The gradients of an update step, around the reducer: its reductions finished, the ranks'
agreement on which gradients exist and on failures (Note [a bad value loses nothing] in
``optimizer``), the late ones reduced; a step without any gradient skipped, and Keras's
warnings for the missing ones."""

from __future__ import annotations

import warnings

from .comm import Communicator
from .reducer import GradReducer
from .sharded_params import ShardedParams

NO_GRADIENTS = "No gradients provided for any variable."
"""Keras's words for a step without any gradient (Keras raises; torch's optimizers do nothing)."""

_STEP_CALLER = 4
"""The warnings' stacklevel: past the warning method, ``reduce`` and the optimizer's step()."""


class StepGrads:
    """Brings the gradients of ``sharded``'s buffers to the update, through ``reducer``."""

    def __init__(self, comm: Communicator, reducer: GradReducer, sharded: ShardedParams) -> None:
        self.comm = comm
        self.reducer = reducer
        self.sharded = sharded
        self._warned_missing: set[frozenset[str]] = set()

    def reduce(self, failure: Exception | None, index_of: dict[int, int]) -> list[list[int]] | None:
        """Collective when sharded: per buffer, the indices of the parameters with a gradient
        on some rank, reduced into the shards; None where no rank had any (the step is
        skipped). Raises on every rank where one failed (``failure``: this rank's, found
        before the reduction); ``index_of``: id(parameter) -> its index in optimizer order."""
        # Note [reduction during backward]: every rank starts its remaining reductions, then
        # all agree on the present gradients, late ones and failures.
        self.reducer.collect()
        self.reducer.reduce()
        present, late, failed = self.reducer.agree(failure is not None)
        if failed:
            if failure is not None:
                raise failure
            raise RuntimeError(
                f"rank {self.comm.rank}/{self.comm.world_size}: step() failed on rank "
                f"{failed - 1} (see its error); the gradients are kept: fix the cause on every "
                "rank and call step() again"
            )
        if not any(present):
            self._skip_step()
            return None
        self._warn_missing(present, index_of)
        self.reducer.reduce_late(late)
        return present

    def _skip_step(self) -> None:
        """No gradient on any rank: like torch's optimizers, do nothing (and warn, with Keras's
        message); the step does not count. Within an accumulation cycle its sums, which Keras
        would drop for every parameter without a gradient at the boundary, are dropped."""
        warnings.warn(NO_GRADIENTS, stacklevel=_STEP_CALLER)
        self.reducer.reset()
        if not self.reducer.starts_cycle:
            self.reducer.end_cycle()
            for buffer in self.sharded.buffers:
                if buffer.flat_grad is not None:
                    buffer.flat_grad.zero_()

    def _warn_missing(self, present: list[list[int]], index_of: dict[int, int]) -> None:
        """Keras's warning for trainable parameters without a gradient on any rank, once per
        set of names."""
        missing = self.sharded.missing_grad_names(present, index_of)
        if missing and frozenset(missing) not in self._warned_missing:
            self._warned_missing.add(frozenset(missing))
            warnings.warn(
                f"Gradients do not exist for variables {missing} when minimizing the loss. If "
                "using `model.compile()`, did you forget to provide a `loss` argument?",
                stacklevel=_STEP_CALLER,
            )
