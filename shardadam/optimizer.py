"""The engine's facade: ShardedOptimizer, a torch optimizer that runs one update rule (a
module of ``shardadam.rules``) with Keras 3's semantics over flat, sharded buffers.

It composes the engine's parts and hands each what it needs: ``ShardedParams`` (the buffers
and the shards' state), ``GradReducer``, ``GradClipper``, ``ShardUpdater`` (the update phase),
``StepGrads`` (the reduced gradients of a step), ``ShardedEMA``, ``ParamGather``,
``DecayExclusions`` and ``StateDictIO``; ``step()`` runs them as phases.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import comm
from .buffers import FlatBuffer
from .clipping import GradClipper
from .config import LR_SCHEDULE_KEY, OptimizerOptions, check_clip_exclusive
from .decay import DecayExclusions
from .ema import ShardedEMA
from .gather import ParamGather
from .kernels import UpdateRunner
from .memory import memory_report
from .param_groups import (
    assign_learning_rate,
    check_group,
    default_group,
    given_param_names,
    group_param_names,
    has_names,
    is_step_schedule,
    new_group,
    param_indices,
    param_names_of,
    refuse_set,
    step_hyperparameters,
)
from .pool import ByteMeter
from .reducer import GradReducer
from .sharded_params import ShardedParams, sharding_options_of
from .state import ShardState
from .state_dict_io import StateDictIO
from .step_grads import NO_GRADIENTS, StepGrads
from .updates import Scalars, ShardUpdater


class ShardedOptimizer(torch.optim.Optimizer):
    """A Keras 3 optimizer whose state is sharded across the ranks of a group; the update
    rule (``rule``, a module of ``shardadam.rules``) is the only part that differs between
    the optimizers of the family (``shardadam.optimizers``).

    Every step, after unscaling (``loss_scale_factor``), gradient accumulation and clipping:
    ``p *= 1 - weight_decay*lr``, the rule's update, then the EMA ``avg = m*avg + (1-m)*p``
    (``avg = p`` at the first step), as Keras's base optimizer does.

    Communication: parameters of one (param group, dtype) live in flat buffers (buckets of
    about ``bucket_cap_mb`` across ranks), each split into ``world_size`` equal shards; rank r
    keeps the state of shard r only. During backward, hooks stage gradients and start each
    bucket's reduction (stage 2: reduce-scatter; stage 1: all-reduce) once it is complete; at
    ``step()`` the rest start, clipping norms are summed over ranks with small all-reduces,
    each rank updates its shards, and the shards are all-gathered back. Without an initialised
    process group the collectives are no-ops and the same code runs in one process.

    State dict: torch's format: ``state`` maps each parameter's index to
    ``{"<name>/<slot>", ...}`` tensors (the rule's slots, e.g. ``momentum``) shaped like the
    parameter (a 1-D piece plus ``"<name>/owned_range"`` where a rank owns part of it);
    ``param_groups`` hold torch's keys; ``shardadam`` holds the rule's name, the step counter,
    options and weight-decay exclusions (see ``state_dict_io``).
    """

    RULE: ModuleType | None = None
    """The rule a member class (``Sharded<Name>``) runs; the base takes it as an argument."""

    _step_supports_amp_scaling = True
    """torch.amp.GradScaler then hands step() its scale instead of unscaling ``p.grad``
    itself, which lets step() refuse it clearly (see ``_refuse_grad_scaler``)."""

    def __init__(
        self,
        params: Iterable[Any],
        rule: ModuleType,
        hyperparameters: dict[str, Any],
        learning_rate: Any,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        jit_compile: bool = True,
        name: str | None = None,
        process_group: object | None = None,
        **sharding_options: Any,
    ) -> None:
        """``rule``: the update rule; ``hyperparameters``: its own arguments (Keras's names,
        every key of ``rule.HYPERPARAMETERS``); the rest are Keras's base-optimizer arguments
        and the sharding options (``ShardingOptions``)."""
        self._rule = rule
        self.options = OptimizerOptions(
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            jit_compile=jit_compile,
            name=rule.NAME if name is None else name,
        )
        check_clip_exclusive(clipnorm, clipvalue, global_clipnorm, "")
        self.sharding = sharding_options_of(type(self).__name__, sharding_options)
        self.process_group = comm.default_group(process_group)
        self._memory_meter = ByteMeter()  # the buffers lent during steps, for memory_report
        self.comm = comm.Communicator(self.process_group, self.sharding.comm, self._memory_meter)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size

        refuse_set(params, "")
        defaults = default_group(
            rule, hyperparameters, learning_rate, weight_decay, clipnorm, clipvalue
        )

        self._sharded = ShardedParams(self.comm, self.sharding, rule, self.options)
        buffers, shard_states = self._sharded.buffers, self._sharded.shard_states
        self._reducer = GradReducer(self.comm, buffers, self.sharding.stage, self._memory_meter)
        self._micro_steps = 0
        self._param_gather = ParamGather(self.comm, buffers, self._sharded.position_of)
        self._decay = DecayExclusions(buffers)
        self._ema = ShardedEMA(self.comm, buffers, shard_states, self._param_gather, self.options)
        self._runner = UpdateRunner(
            jit_compile, announce=self.comm.rank == 0, owner=type(self).__name__
        )
        self._clipper = GradClipper(self.comm, buffers, self.options.global_clipnorm)
        self._state_io = StateDictIO(
            rule, self._sharded, self._reducer, self._decay, self.options, type(self).__name__
        )
        self._grads = StepGrads(self.comm, self._reducer, self._sharded)
        self._scheduled_lr: dict[int, float] = {}
        """Group index -> the scheduled rate last recorded in its ``group["lr"]``."""
        super().__init__(params, defaults)  # adds the param groups (add_param_group)
        # ``state`` is the shards' views that ShardedParams binds (torch's __init__ sets an
        # empty dict, which nothing has read yet); the updater reads ``param_groups``.
        self.state = self._sharded.param_state
        self._updater = ShardUpdater(
            rule, self._sharded, self.param_groups, self._decay, self._runner, self.options
        )
        self.register_state_dict_post_hook(ShardedOptimizer._pack_state_dict)

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (Keras or torch names for its overrides); on every rank when sharded."""
        index, owner = len(self.param_groups), type(self).__name__
        super().add_param_group(
            new_group(self._rule, param_group, self.param_groups, self.defaults, owner)
        )
        group, where = self.param_groups[-1], f" (param group {index})"
        check_group(self._rule, group, where)
        check_clip_exclusive(
            group["clipnorm"], group["clipvalue"], self.options.global_clipnorm, where
        )
        names = group_param_names(self.param_groups, index)
        for _ in self._sharded.add_group(index, group, names, ema_started=self.iterations > 0):
            self._reducer.add_buffer()
        if self._decay.any:
            self._rebuild_decay_masks()  # the patterns apply to the new parameters too

    @property
    def buffers(self) -> list[FlatBuffer]:
        """The flat buffers (see ``ShardedParams``)."""
        return self._sharded.buffers

    @property
    def shard_states(self) -> list[ShardState]:
        """The state of this rank's shard of each buffer."""
        return self._sharded.shard_states

    def param_names(self) -> list[str]:
        """Each parameter's name in optimizer order (over all groups): the name it was given
        with ``named_parameters()``, else ``"group<g>.param<i>"``."""
        return param_names_of(self.param_groups)

    def owned_range(self, param: Tensor) -> tuple[int, int] | None:
        """Elements [start, end) of the flattened ``param`` whose state this rank holds (the
        whole parameter in one process), or None where another rank owns all of it."""
        return self._sharded.owned_range(param)

    # ------------------------------------------------------------------ Keras conventions

    @property
    def iterations(self) -> int:
        """Number of updates applied (micro-steps // gradient_accumulation_steps)."""
        steps = self.options.gradient_accumulation_steps
        return self._micro_steps // steps if steps else self._micro_steps

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The global L2 norm of the gradients the last update used, before clipping (None
        before the first update)."""
        return self._clipper.last_grad_norm

    @property
    def learning_rate(self) -> float | Tensor:
        """The learning rate the next step uses (of the first param group)."""
        return self._group_learning_rate(0, record=False)

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        assign_learning_rate(self.param_groups, learning_rate)
        self._scheduled_lr.clear()

    def _group_learning_rate(self, index: int, record: bool) -> float | Tensor:
        """Group ``index``'s learning rate for the coming step; a schedule's value is recorded
        in ``group["lr"]`` where ``record`` (torch's tooling reads it there)."""
        group = self.param_groups[index]
        schedule = group[LR_SCHEDULE_KEY]
        if schedule is None:
            lr = group["lr"]
            if not isinstance(lr, Tensor) and not (lr >= 0 and math.isfinite(lr)):
                raise ValueError(f"Invalid learning rate in param group: {lr} (expected lr >= 0)")
            return lr
        if index in self._scheduled_lr and group["lr"] != self._scheduled_lr[index]:
            raise TypeError(
                f"param group {index}'s learning rate comes from a schedule or callable, hence "
                "it is not settable (something wrote group['lr']); use a float learning_rate "
                "to drive it with a torch LR scheduler"
            )
        value = schedule(self._micro_steps) if is_step_schedule(schedule) else schedule()
        # Note [no host sync in the step] (in ``functional``): the scalars are formed on the
        # host, so the value is read there: from host memory for the CPU tensors that
        # shardadam.schedules return, with a device sync for a schedule returning a CUDA one.
        value = float(value)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"Invalid learning rate from the schedule: {value} (expected >= 0)")
        if record:
            group["lr"] = value
            self._scheduled_lr[index] = value
        return value

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients over several backward passes with no communication.

        Inside the block, gradients add up in ``p.grad`` as autograd leaves them; the first
        ``step()`` after the block reduces their sum once, as DDP's ``no_sync`` does.
        """
        previous, self._reducer.sync_enabled = self._reducer.sync_enabled, False
        try:
            yield
        finally:
            self._reducer.sync_enabled = previous

    def scale_loss(self, loss: Tensor) -> Tensor:
        """Multiply the loss by ``loss_scale_factor`` (step() divides the gradients by it)."""
        factor = self.options.loss_scale_factor
        return loss if factor is None else loss * factor

    def exclude_from_weight_decay(
        self, var_list: Iterable[Tensor] | None = None, var_names: Iterable[str] | None = None
    ) -> None:
        """Exclude parameters from weight decay: those in ``var_list``, and those whose name
        contains a match of any regular expression in ``var_names`` (``re.search``).

        Replaces earlier exclusions, as in Keras.
        """
        index_of, named = param_indices(self.param_groups), has_names(self.param_groups)
        self._decay.replace(var_list, var_names, index_of, named)
        self._rebuild_decay_masks()

    def _excluded_from_weight_decay(self) -> set[int]:
        """Indices (in optimizer order) of the parameters weight decay skips."""
        return self._decay.excluded(given_param_names(self.param_groups))

    def _rebuild_decay_masks(self) -> None:
        groups = self.param_groups
        self._decay.rebuild_masks(param_indices(groups), given_param_names(groups))

    # ------------------------------------------------------------------ the step

    @property
    def _micro_steps(self) -> int:
        return self._micro_step_count

    @_micro_steps.setter
    def _micro_steps(self, count: int) -> None:
        # The reducer's hooks act on the phase of the coming micro-step.
        self._micro_step_count = count
        steps = self.options.gradient_accumulation_steps
        self._reducer.update_step = not steps or (count + 1) % steps == 0
        self._reducer.starts_cycle = not steps or count % steps == 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Collective when sharded: apply one step (or one micro-step of accumulation).

        Note [a bad value loses nothing]: every hyperparameter is read and checked, and every
        parameter found still in place, before any state or gradient changes. Across ranks the
        gradients are first reduced (the same collectives on every rank) and kept, the ranks
        agree on the failure in the step's one small all-reduce, and every rank raises; calling
        step() again once the cause is fixed applies exactly the update it would have applied.
        """
        self._refuse_grad_scaler()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.wait_for_params()  # the update writes the shards the gathers read
        if not self._reducer.sync_enabled:
            raise RuntimeError(
                "step() was called inside opt.no_sync(); accumulate with backward() inside the "
                "block and call step() after it"
            )
        if not self._reducer.update_step:
            return self._accumulation_step(loss)
        failure = None
        try:
            self._sharded.check_in_place(type(self).__name__)
            scalars = self._update_scalars()
        except Exception as error:
            if not self.comm.active:
                raise  # nothing was touched
            failure = error
        present = self._grads.reduce(failure, param_indices(self.param_groups))
        if present is None:  # no gradient on any rank: skipped, as torch's optimizers do
            return loss
        self._apply_update(scalars, present)
        self._gather_params(overlap=self.sharding.overlap_param_gather)
        self._micro_steps += 1
        self._reducer.hook_trainable()
        return loss

    def _update_scalars(self) -> Scalars:
        """This step's packed scalars per buffer, every hyperparameter read and checked."""
        ema_momentum, ema_overwrite = self._ema.scalars(self.iterations)
        lr_of = functools.partial(self._group_learning_rate, record=True)
        per_group = step_hyperparameters(self._rule, self.param_groups, lr_of)
        return self._updater.scalars(per_group, self.iterations + 1, ema_momentum, ema_overwrite)

    def _apply_update(self, scalars: Scalars, present: list[list[int]]) -> None:
        """Collective when sharded: clip the reduced shard gradients and update the shards."""
        self._sharded.refresh_masters()
        grad_masks = self._updater.prepare_grads(present)
        grad_scale, local_sq = self._clipper.clip_(self._buffer_clipnorms())
        kernel_sq = self._update_shards(scalars, grad_masks, grad_scale)
        self._updater.advance_carry()  # once per applied update, not per buffer
        self._reducer.release_bound_grads()
        if grad_scale is None:
            self._clipper.record_grad_norm(
                [k if known is None else known for known, k in zip(local_sq, kernel_sq)]
            )
        self._reducer.reset()
        self._reducer.end_cycle()

    def _update_shards(
        self, scalars: Scalars, grad_masks: list[Tensor | None], grad_scale: Tensor | None
    ) -> list[Tensor]:
        """Update every owned shard (see ``ShardUpdater.update_shards``)."""
        return self._updater.update_shards(scalars, grad_masks, grad_scale)

    def _buffer_clipnorms(self) -> list[float | None]:
        return [self.param_groups[g]["clipnorm"] for g in self._sharded.buffer_groups]

    def _accumulation_step(self, loss: Any) -> Any:
        """A micro-step that only accumulates (Note [accumulation without communication])."""
        self._sharded.check_in_place(type(self).__name__)
        if not self._reducer.has_local_grads():
            # The micro-step still counts (as a zero gradient): ranks cannot agree on skipping
            # it without a collective, which micro-steps do not make.
            warnings.warn(NO_GRADIENTS, stacklevel=3)
        self._sharded.refresh_masters()
        self._reducer.accumulate()
        if self._ema.advance_only(self.iterations):
            self._gather_params()
        self._micro_steps += 1
        return loss

    def _refuse_grad_scaler(self) -> None:
        if "grad_scale" in self.__dict__ or "found_inf" in self.__dict__:
            name = type(self).__name__
            raise RuntimeError(
                f"torch.amp.GradScaler cannot drive {name}: its inf checks and unscaling "
                "read p.grad, which across ranks holds no reduced gradient, so ranks could "
                "skip different steps. Use bf16 parameters (the fp32 master weights need no "
                f"loss scaling) or a static loss scale: {name}(..., "
                "loss_scale_factor=1024.0) with opt.scale_loss(loss).backward()"
            )

    def _gather_params(self, overlap: bool = False) -> None:
        """Collective: every rank's updated shards reach every rank (see ``gather``)."""
        self._param_gather.gather(overlap)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad; across ranks it also drops the gradients already handed to the
        optimizer for this step (staged, reducing or reduced), which ``model.zero_grad()``
        cannot reach."""
        if self._reducer.has_staged() and not self._reducer.starts_cycle:
            raise RuntimeError(
                "opt.zero_grad() after the backward of the last micro-step of an accumulation "
                "cycle cannot drop that backward's gradients apart from the cycle's sums; call "
                "zero_grad() before backward"
            )
        super().zero_grad(set_to_none)
        self._reducer.reset()

    def close(self) -> None:
        """Remove the gradient hooks and finish the gathers in flight; the optimizer can no
        longer take gradients during backward (gradients left in ``p.grad`` still work in one
        process). Garbage collection does the same."""
        self.wait_for_params()
        self._reducer.reset()
        self._reducer.close()

    def __reduce_ex__(self, protocol: Any) -> Any:
        name = type(self).__name__
        raise TypeError(
            f"a {name} cannot be pickled or copied: its state lives in flat buffers that "
            "the model's parameters are views of (and across ranks, in other processes); save "
            f"opt.state_dict() or use shardadam.checkpoint, and load it into a new {name}"
        )

    def __del__(self) -> None:
        # Gathers left in flight (overlap_param_gather) would hold the process group's
        # connections and leave the global forward hook behind.
        with contextlib.suppress(Exception):  # best effort while being collected
            self.wait_for_params()

    def wait_for_params(self, params: Iterable[Tensor] | None = None) -> None:
        """Wait until the parameters (all, or ``params``) hold their gathered values.

        Only needed with overlap_param_gather=True, for parameters read from another thread
        than the one calling step(), or by compiled code before any module call; other reads
        wait by themselves (Note [gather during forward]).
        """
        self._param_gather.wait(params)

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds, by kind, and the most it held at once (``peak``):
        ``optimizer_state`` (the rule's ``slots``, EMA, fp32 master), the gradient, receive
        and parameter buffers; see ``shardadam.memory.memory_report`` for each key."""
        return memory_report(
            self.buffers, self.shard_states, self._reducer, self.comm, self._memory_meter
        )

    def reset_memory_peak(self) -> None:
        """Start ``memory_report()["peak"]`` again from what is held now."""
        self._memory_meter.reset_peak()

    # ------------------------------------------------------------------ the EMA

    def moving_average(self, param: Tensor) -> Tensor:
        """Collective when sharded: the EMA of ``param`` as a new full tensor (compute dtype)."""
        return self._ema.moving_average(param)

    def finalize_variable_values(self, var_list: Iterable[Tensor] | None = None) -> None:
        """Collective when sharded: write the EMA into the parameters (all, or ``var_list``).

        Does nothing without ``use_ema``, as in Keras.
        """
        self._ema.finalize(var_list)

    def swap_moving_averages(self) -> contextlib.AbstractContextManager[None]:
        """Collective when sharded: parameters hold their EMA inside the block, then return."""
        return self._ema.swapped()

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict (see the class docstring), after any gather in flight."""
        self.wait_for_params()
        self._sharded.refresh_masters()
        return super().state_dict()

    def _pack_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """state_dict post-hook: drop code from the groups, add the optimizer-wide state."""
        carry = self._updater.carry_values()
        groups, micro_steps = self.param_groups, self._micro_steps
        return self._state_io.pack(state_dict, groups, micro_steps, self.iterations, carry)

    def consolidated_state_dict(self, to_rank: int = 0) -> dict[str, Any] | None:
        """Collective: the state_dict one process would hold, on rank ``to_rank`` (None on the
        others), which loads at any world size (see ``state.consolidate_state_dict``)."""
        return self._state_io.consolidated(self.state_dict(), self.param_groups, to_rank)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Collective when sharded: restore a ``state_dict()`` of this optimizer over the same
        parameters, then gather the parameters from their owners' shards.

        Schedules and callables are code, not state: this optimizer keeps its own. A
        state_dict saved in one process loads at any world size; one saved sharded loads at
        the same world size (``shardadam.checkpoint`` reshards). A state_dict that does not
        fit raises before anything changes (see ``check_state_dict``).
        """
        self.wait_for_params()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self.check_state_dict(state_dict)
        extra = state_dict["shardadam"]
        self._micro_steps = int(extra["micro_steps"])
        self._updater.load_carry(extra.get("carry"))
        self._reducer.reset()  # what was staged belongs to the state being replaced
        self._reducer.end_cycle()
        self._scheduled_lr.clear()
        self._state_io.load(state_dict, self.param_groups)
        self._gather_params()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise what ``load_state_dict`` would refuse, changing nothing (not a collective:
        it checks only what this rank would load); a state_dict saved by an optimizer of
        another rule is refused."""
        self._state_io.check(state_dict, self.param_groups)
