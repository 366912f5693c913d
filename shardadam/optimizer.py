"""The engine's facade: ShardedOptimizer, a torch optimizer that runs one update rule (a
module of ``shardadam.rules``) with Keras 3's semantics over flat, sharded buffers."""

from __future__ import annotations

import contextlib
import dataclasses
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
from .config import (
    BASE_GROUP_KEYS,
    LR_SCHEDULE_KEY,
    OptimizerOptions,
    ShardingOptions,
    check_base_group,
    check_clip_exclusive,
    check_learning_rate,
    group_from_keras_names,
)
from .decay import DecayExclusions
from .ema import ShardedEMA
from .functional import (
    GRAD_SCALE_FROM_END,
    engine_scalars,
    host_scalar,
    refresh_master_,
    shard_step_,
    shard_step_inplace_,
)
from .gather import ParamGather
from .kernels import UpdateRunner
from .layout import build_layout
from .pool import ByteMeter
from .reducer import GradReducer
from .rule_groups import (
    check_group_shape,
    evaluated,
    fill_tuple_gaps,
    group_entries,
    hyperparameters_of,
    merged_saved_value,
    rule_group_keys,
    without_code,
)
from .state import (
    ACCUMULATOR,
    AVERAGE,
    MASTER,
    MOMENTUM,
    VELOCITY,
    VELOCITY_HAT,
    ShardState,
    bind_param_state,
    check_saved_accumulators,
    consolidate_state_dict,
    saved_accumulators,
    saved_shard_pieces,
)

NO_GRADIENTS = "No gradients provided for any variable."
"""Keras's words for a step without any gradient (Keras raises; torch's optimizers do nothing)."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_step_schedule(schedule: Callable) -> bool:
    """Keras-style schedules take the step counter; other callables take no argument."""
    return any(cls.__name__ == "LearningRateSchedule" for cls in type(schedule).__mro__)


def _split_learning_rate(learning_rate: Any) -> tuple[Any, Callable | None]:
    """(value for group["lr"], schedule or callable or None)."""
    if isinstance(learning_rate, Tensor) or not callable(learning_rate):
        return learning_rate, None
    value = learning_rate(0) if _is_step_schedule(learning_rate) else learning_rate()
    return float(value), learning_rate


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
    parameter (a 1-D
    piece plus ``"<name>/owned_range"`` where a rank owns part of it); ``param_groups`` hold
    torch's keys; ``shardadam`` holds the step counter, options and weight-decay exclusions.
    """

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
        name = rule.NAME if name is None else name
        self.options = OptimizerOptions(
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            jit_compile=jit_compile,
            name=name,
        )
        check_clip_exclusive(clipnorm, clipvalue, global_clipnorm, "")
        known = {f.name for f in dataclasses.fields(ShardingOptions)}
        unknown = sorted(set(sharding_options) - known)
        if unknown:
            raise ValueError(
                f"Argument(s) not recognized: {unknown} ({type(self).__name__} takes Keras's "
                f"{type(self).__name__.removeprefix('Sharded')} arguments, process_group, and the "
                f"sharding options "
                f"{sorted(known)})"
            )
        self.sharding = ShardingOptions(**sharding_options)
        self.process_group = comm.default_group(process_group)
        self._memory_meter = ByteMeter()  # the buffers lent during steps, for memory_report
        self.comm = comm.Communicator(self.process_group, self.sharding.comm, self._memory_meter)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size

        _refuse_set(params, "")
        check_learning_rate(learning_rate)
        lr_value, lr_schedule = _split_learning_rate(learning_rate)
        defaults = {
            "lr": lr_value,
            LR_SCHEDULE_KEY: lr_schedule,
            **group_entries(rule, hyperparameters),
            "weight_decay": 0.0 if weight_decay is None else weight_decay,
            "clipnorm": clipnorm,
            "clipvalue": clipvalue,
        }
        self._check_group(defaults, "")

        self.buffers: list[FlatBuffer] = []
        self.shard_states: list[ShardState] = []
        self._buffer_groups: list[int] = []
        self._reducer = GradReducer(
            self.comm, self.buffers, self.sharding.stage, self._memory_meter
        )
        self._micro_steps = 0
        self._position_of: dict[int, tuple[int, int]] = {}
        """id(parameter) -> (its buffer, its index in the buffer)."""
        self._param_gather = ParamGather(self.comm, self.buffers, self._position_of)
        self._has_names = False
        self._decay = DecayExclusions(self.buffers)
        self._scheduled_lr: dict[int, float] = {}
        self._ema = ShardedEMA(
            self.comm, self.buffers, self.shard_states, self._param_gather, self.options
        )
        self._runner = UpdateRunner(jit_compile, announce=self.comm.rank == 0)
        self._clipper = GradClipper(self.comm, self.buffers, self.options.global_clipnorm)
        self._warned_missing: set[frozenset[str]] = set()
        self._carry = {
            k: torch.tensor(v, dtype=torch.float32) for k, v in _rule_carry(rule).items()
        }
        """The rule's optimizer-wide state (Nadam's u_product), float32 as Keras keeps it."""
        self._next_carry = self._carry
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(_pack_shardadam_state)

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (Keras or torch names for its overrides); on every rank when sharded."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        where = f" (param group {len(self.param_groups)})"
        keys = {**BASE_GROUP_KEYS, **rule_group_keys(self._rule)}
        group = group_from_keras_names(param_group, f"param group {len(self.param_groups)}", keys)
        fill_tuple_gaps(self._rule, group, self.defaults)
        if "lr" in group:
            check_learning_rate(group["lr"], f"learning_rate{where}")
            group["lr"], group[LR_SCHEDULE_KEY] = _split_learning_rate(group["lr"])
        if group.get("weight_decay", 0.0) is None:
            group["weight_decay"] = 0.0
        params = group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        _refuse_set(params, where)
        params = list(params) if params is not None else []
        self._check_params(params, where)
        group["params"] = params
        if not params and self.param_groups and "param_names" in self.param_groups[0]:
            group["param_names"] = []  # an empty group has no names to disagree with
        super().add_param_group(group)
        group = self.param_groups[-1]
        self._check_group(group, where)
        check_clip_exclusive(
            group["clipnorm"], group["clipvalue"], self.options.global_clipnorm, where
        )
        self._has_names = all("param_names" in g for g in self.param_groups)
        self._build_buffers(len(self.param_groups) - 1)
        if self._decay.any:
            self._rebuild_decay_masks()  # the patterns apply to the new parameters too

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        """Validate one param group's hyperparameters (as stored: torch keys)."""
        schedule = group.get(LR_SCHEDULE_KEY)
        check_learning_rate(
            schedule if schedule is not None else group["lr"], f"learning_rate{where}"
        )
        check_group_shape(self._rule, group, where)
        self._rule.check(hyperparameters_of(self._rule, group), where)
        check_base_group(group, where)

    def _check_params(self, params: list[Any], where: str) -> None:
        seen = {
            id(p): f"{n!r} (param group {gi})" if "param_names" in g else f"#{i} (param group {gi})"
            for gi, g in enumerate(self.param_groups)
            for i, (n, p) in enumerate(zip(g.get("param_names", g["params"]), g["params"]))
        }
        devices = {p.device for g in self.param_groups for p in g["params"]}
        for i, item in enumerate(params):
            name, p = (repr(item[0]), item[1]) if isinstance(item, tuple) else (f"#{i}", item)
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"parameter {name}{where} is a {type(p).__name__}; expected a tensor, a "
                    "(name, tensor) pair or a param-group dict"
                )
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(
                    f"parameter {name}{where} is sparse; {type(self).__name__} needs dense "
                    "parameters"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"parameter {name}{where} has dtype {p.dtype}; expected a floating dtype "
                    "(float16, bfloat16, float32 or float64)"
                )
            if id(p) in seen:
                raise ValueError(
                    f"parameter {name}{where} is given twice: it is the same tensor as "
                    f"parameter {seen[id(p)]}; pass each parameter once "
                    "(model.parameters() already removes tied duplicates)"
                )
            seen[id(p)] = f"{name}{where}"
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(
                f"parameters are on several devices {sorted(map(str, devices))}; "
                f"{type(self).__name__} "
                "needs all parameters on one device (the rank's device)"
            )

    def _build_buffers(self, group_index: int) -> None:
        group = self.param_groups[group_index]
        names = self._group_param_names(group_index)
        self._check_ranks_agree(group_index, names, group["params"])
        by_dtype: dict[torch.dtype, list[tuple[str, Tensor]]] = {}
        for name, p in zip(names, group["params"]):
            by_dtype.setdefault(p.dtype, []).append((name, p))
        # Note [gradient storage per stage]
        keep_full_grad = self.sharding.stage == 1 or not self.comm.active
        for named in (b for same_dtype in by_dtype.values() for b in self._buckets(same_dtype)):
            layout = build_layout(
                [tuple(p.shape) for _, p in named],
                [n for n, _ in named],
                self.world_size,
                self.sharding.align_numel,
            )
            buffer = FlatBuffer([p for _, p in named], layout, self.rank, keep_full_grad)
            self.buffers.append(buffer)
            self._buffer_groups.append(group_index)
            self.shard_states.append(self._new_shard_state(buffer, group))
            self._bind_param_state(len(self.buffers) - 1)
            b = len(self.buffers) - 1
            self._position_of.update((id(p), (b, i)) for i, p in enumerate(buffer.params))
            self._reducer.add_buffer()

    def _group_param_names(self, group_index: int) -> list[str]:
        group = self.param_groups[group_index]
        return group.get("param_names") or [
            f"group{group_index}.param{i}" for i in range(len(group["params"]))
        ]

    def param_names(self) -> list[str]:
        """Each parameter's name in optimizer order (over all groups): the name it was given
        with ``named_parameters()``, else ``"group<g>.param<i>"``."""
        return [n for g in range(len(self.param_groups)) for n in self._group_param_names(g)]

    def owned_range(self, param: Tensor) -> tuple[int, int] | None:
        """Elements [start, end) of the flattened ``param`` whose state this rank holds (the
        whole parameter in one process), or None where another rank owns all of it."""
        position = self._position_of.get(id(param))
        if position is None:
            raise ValueError(
                f"owned_range(): the tensor of shape {tuple(param.shape)} is not optimized here"
            )
        b, index = position
        piece = self.buffers[b].piece_of(index)
        return None if piece is None else (piece.param.start, piece.param.end)

    def _buckets(self, named: list[tuple[str, Tensor]]) -> list[list[tuple[str, Tensor]]]:
        """Split one dtype's parameters into buffers of about ``bucket_cap_mb`` each.

        Across ranks each buffer is reduced as one bucket; buckets are filled from the last
        parameter backwards, the order in which backward produces gradients. One process needs
        no buckets: its parameters of one dtype share one buffer.
        """
        if not self.comm.active:
            return [named]
        cap_numel = int(self.sharding.bucket_cap_mb * 2**20) // named[0][1].element_size()
        buckets: list[list[tuple[str, Tensor]]] = [[]]
        filled = 0
        for name, p in reversed(named):
            if buckets[-1] and filled + p.numel() > cap_numel:
                buckets.append([])
                filled = 0
            buckets[-1].insert(0, (name, p))
            filled += p.numel()
        return buckets

    def _check_ranks_agree(self, group_index: int, names: list[str], params: list[Tensor]) -> None:
        """Collective: every rank must hold the same parameters, or all raise naming the first
        that differs (instead of hanging in a later collective)."""
        if not self.comm.active:
            return
        mine = [(n, tuple(p.shape), str(p.dtype)) for n, p in zip(names, params)]
        everyone = self.comm.all_gather_objects(mine)
        reference = everyone[0]
        for rank, theirs in enumerate(everyone[1:], start=1):
            if theirs == reference:
                continue
            where = f"rank {self.rank}/{self.world_size}: param group {group_index}: "
            for (n0, s0, d0), (n1, s1, d1) in zip(reference, theirs):
                if (n0, s0, d0) != (n1, s1, d1):
                    raise RuntimeError(
                        f"{where}parameter {n1!r} has shape {s1} and dtype {d1} on rank {rank} "
                        f"but rank 0 has {n0!r} with shape {s0} and dtype {d0}; every rank must "
                        "pass the same parameters in the same order"
                    )
            more_rank, more = (rank, theirs) if len(theirs) > len(reference) else (0, reference)
            n, shape, dtype = more[min(len(theirs), len(reference))]
            raise RuntimeError(
                f"{where}rank {rank} has {len(theirs)} parameters but rank 0 has "
                f"{len(reference)}: the first extra one is {n!r} (shape {shape}, {dtype}) on "
                f"rank {more_rank}; every rank must pass the same parameters in the same order"
            )

    def _new_shard_state(self, buffer: FlatBuffer, group: dict[str, Any]) -> ShardState:
        dtype = _compute_dtype(buffer.dtype)

        def zeros() -> Tensor:
            return torch.zeros(buffer.shard.numel, dtype=dtype, device=buffer.device)

        slots = self._rule.slots(self._rule_hyperparameters(group))
        state = ShardState(slots={name: torch.full_like(zeros(), v) for name, v in slots.items()})
        if dtype != buffer.dtype:
            state.master = buffer.shard_param.to(dtype)
        if self.options.use_ema:
            # Keras starts averages at zero and takes the parameter at step 1; parameters added
            # after step 1 start their average at their current value instead of at zero.
            started = self.iterations > 0
            weights = buffer.shard_param if state.master is None else state.master
            state.ema = weights.to(dtype, copy=True) if started else zeros()
        return state

    def _bind_param_state(self, buffer_index: int) -> None:
        """Point ``self.state[p]`` at views of the shard state (what this rank owns of p)."""
        buffer, shard_state = self.buffers[buffer_index], self.shard_states[buffer_index]
        bind_param_state(self.state, buffer, shard_state, self.options.name)

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
        check_learning_rate(learning_rate)
        value, schedule = _split_learning_rate(learning_rate)
        for group in self.param_groups:
            if group[LR_SCHEDULE_KEY] is not None and schedule is None:
                raise TypeError(
                    "This optimizer was created with a schedule or callable as its "
                    "learning_rate, hence its learning rate is not settable to a number; "
                    "assign another schedule or create the optimizer with a float learning_rate"
                )
        for index, group in enumerate(self.param_groups):
            group["lr"], group[LR_SCHEDULE_KEY] = value, schedule
            self._scheduled_lr.pop(index, None)

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
        self._decay.replace(var_list, var_names, self._param_indices(), self._has_names)
        self._rebuild_decay_masks()

    def _excluded_from_weight_decay(self) -> set[int]:
        """Indices (in optimizer order) of the parameters weight decay skips."""
        return self._decay.excluded(self._names_in_order())

    def _names_in_order(self) -> list[str]:
        return [n for g in self.param_groups for n in g.get("param_names", ())]

    def _param_indices(self) -> dict[int, int]:
        """id(parameter) -> its index in optimizer order (over all groups), as in state_dict."""
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _global_param_indices(self, buffer_index: int) -> list[int]:
        """Index in optimizer order (over all groups) of each parameter of a buffer."""
        index_of = self._param_indices()
        return [index_of[id(p)] for p in self.buffers[buffer_index].params]

    def _rebuild_decay_masks(self) -> None:
        self._decay.rebuild_masks(self._param_indices(), self._names_in_order())

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
            self._check_params_in_place()
            scalars = self._update_scalars()
        except Exception as error:
            if not self.comm.active:
                raise  # nothing was touched
            failure = error
        # Note [reduction during backward]: every rank starts its remaining reductions, then
        # all agree on the present gradients, late ones and failures.
        self._reducer.collect()
        self._reducer.reduce()
        present, late, failed = self._reducer.agree(failure is not None)
        if failed:
            if failure is not None:
                raise failure
            raise RuntimeError(
                f"rank {self.rank}/{self.world_size}: step() failed on rank {failed - 1} (see "
                "its error); the gradients are kept: fix the cause on every rank and call "
                "step() again"
            )
        if not any(present):
            self._skip_step_without_grads()
            return loss
        self._warn_missing_grads(present)
        self._reducer.reduce_late(late)
        self._refresh_masters()
        grad_masks = self._prepare_shard_grads(present, self.options.gradient_accumulation_steps)
        grad_scale, local_sq = self._clipper.clip_(self._buffer_clipnorms())
        kernel_sq = self._update_shards(scalars, grad_masks, grad_scale)
        self._carry = self._next_carry  # advanced once per applied update, not per buffer
        self._reducer.release_bound_grads()
        if grad_scale is None:
            self._clipper.record_grad_norm(
                [k if known is None else known for known, k in zip(local_sq, kernel_sq)]
            )
        self._reducer.reset()
        self._reducer.end_cycle()
        self._gather_params(overlap=self.sharding.overlap_param_gather)
        self._micro_steps += 1
        self._reducer.hook_trainable()
        return loss

    def _accumulation_step(self, loss: Any) -> Any:
        """A micro-step that only accumulates (Note [accumulation without communication])."""
        self._check_params_in_place()
        if not self._reducer.has_local_grads():
            # The micro-step still counts (as a zero gradient): ranks cannot agree on skipping
            # it without a collective, which micro-steps do not make.
            warnings.warn(NO_GRADIENTS, stacklevel=3)
        self._refresh_masters()
        self._reducer.accumulate()
        if self._ema.advance_only(self.iterations):
            self._gather_params()
        self._micro_steps += 1
        return loss

    def _skip_step_without_grads(self) -> None:
        """No gradient on any rank: like torch's optimizers, do nothing (and warn, with Keras's
        message); the step does not count. Within an accumulation cycle its sums, which Keras
        would drop for every parameter without a gradient at the boundary, are dropped."""
        warnings.warn(NO_GRADIENTS, stacklevel=3)
        self._reducer.reset()
        if not self._reducer.starts_cycle:
            self._reducer.end_cycle()
            for buffer in self.buffers:
                if buffer.flat_grad is not None:
                    buffer.flat_grad.zero_()

    def _warn_missing_grads(self, present: list[list[int]]) -> None:
        """Keras's warning for trainable parameters without a gradient on any rank, once per
        set of names."""
        missing = []  # (index in optimizer order, name), Keras names them in that order
        for b, (buffer, have) in enumerate(zip(self.buffers, present)):
            if len(have) < len(buffer.params):
                have = set(have)
                missing += [
                    (index, span.name)
                    for index, span, p in zip(
                        self._global_param_indices(b), buffer.layout.params, buffer.params
                    )
                    if p.requires_grad and span.index not in have
                ]
        missing = [name for _, name in sorted(missing)]
        if missing and frozenset(missing) not in self._warned_missing:
            self._warned_missing.add(frozenset(missing))
            warnings.warn(
                f"Gradients do not exist for variables {missing} when minimizing the loss. If "
                "using `model.compile()`, did you forget to provide a `loss` argument?",
                stacklevel=3,
            )

    def _check_params_in_place(self) -> None:
        """Raise if a parameter stopped being a view of its flat buffer (the model was
        converted or moved after the optimizer was built): its updates would be lost."""
        for buffer in self.buffers:
            index = buffer.first_detached()
            if index is not None:
                span, p = buffer.layout.params[index], buffer.params[index]
                raise RuntimeError(
                    f"parameter '{span.name}' ({p.dtype} on {p.device}) is no longer a view of "
                    f"{type(self).__name__}'s flat {buffer.dtype} buffer on {buffer.device}: "
                    "the model was converted or moved after the optimizer was built "
                    "(model.double(), .to(device), .to(memory_format=...)), so step() could not "
                    "change it; "
                    "build the optimizer after moving or converting the model"
                )

    def _refresh_masters(self) -> None:
        """Note [parameters changed outside the optimizer]: a bf16/fp16 parameter that no
        longer equals its rounded fp32 master (a loaded state_dict or checkpoint, a
        re-initialisation) is taken as it is now, as an fp32 parameter would be."""
        for buffer, state in zip(self.buffers, self.shard_states):
            if state.master is not None:
                refresh_master_(state.master, buffer.shard_param)

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

    def _prepare_shard_grads(
        self, present: list[list[int]], steps: int | None
    ) -> list[Tensor | None]:
        """Unscale and average the accumulated shard gradients; the masks of present ones.

        Keras: g = (g + sum of earlier micro-step gradients) / steps / loss_scale_factor. A
        parameter without a gradient at this step is skipped, its accumulated sum dropped (as
        Keras does), so that it adds nothing to the norms that clipping uses either.
        """
        divisor = (self.options.loss_scale_factor or 1.0) * (steps or 1)
        masks = []
        for buffer, have in zip(self.buffers, present):
            mask = None if len(have) == len(buffer.params) else buffer.shard_mask(have)
            if divisor != 1.0:
                buffer.shard_grad.div_(divisor)
            if steps and mask is not None:
                buffer.shard_grad.mul_(mask)
            masks.append(mask)
        return masks

    def _buffer_clipnorms(self) -> list[float | None]:
        return [self.param_groups[g]["clipnorm"] for g in self._buffer_groups]

    def _group_learning_rate(self, index: int, record: bool) -> float | Tensor:
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
        value = schedule(self._micro_steps) if _is_step_schedule(schedule) else schedule()
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

    def _rule_hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        """The rule's hyperparameters under Keras's names, as a param group stores them."""
        return hyperparameters_of(self._rule, group)

    def _update_scalars(self) -> list[tuple[Tensor, Tensor]]:
        """Per buffer, the packed UpdateScalars of this step: in host memory (the eager
        kernel's floats) and on the buffer's device (Note [no host sync in the step] in
        ``functional``)."""
        ema_momentum, ema_overwrite = self._ema.scalars(self.iterations)
        per_group = []
        for index, group in enumerate(self.param_groups):
            self._check_group(group, f" (param group {index})")
            lr = self._group_learning_rate(index, record=True)
            if hasattr(self._rule, "check_learning_rate"):  # a rule that divides by it
                self._rule.check_learning_rate(float(lr), f" (param group {index})")
            per_group.append((lr, evaluated(self._rule, self._rule_hyperparameters(group))))
        scalars = []
        for b, buffer in enumerate(self.buffers):
            group = self.param_groups[self._buffer_groups[b]]
            lr, hp = per_group[self._buffer_groups[b]]
            dtype = _compute_dtype(buffer.dtype)
            lr_tensor = host_scalar(lr, dtype)
            packed = torch.cat(
                [
                    self._rule_scalars(hp, lr_tensor, dtype),
                    engine_scalars(
                        lr_tensor,
                        group["weight_decay"],
                        clip_value=group["clipvalue"],
                        ema_momentum=ema_momentum,
                        ema_overwrite=ema_overwrite,
                        dtype=dtype,
                    ),
                ]
            )
            # From pageable memory the host waits for the CUDA stream to copy; pinned, the copy
            # is queued. A new pinned tensor each step: the caching host allocator keeps each
            # until its copy has run.
            source = packed.pin_memory() if buffer.device.type == "cuda" else packed
            scalars.append((packed, source.to(buffer.device, non_blocking=True)))
        return scalars

    def _rule_scalars(self, hp: dict[str, Any], lr: Tensor, dtype: torch.dtype) -> Tensor:
        """The rule's packed scalars of this step; a rule with optimizer-wide state also says
        what that state becomes, which the step keeps once the update is applied."""
        step = self.iterations + 1
        if not self._carry:
            return self._rule.scalars(hp, lr, step, dtype)
        carry = {k: v.to(dtype) for k, v in self._carry.items()}
        packed, new_carry = self._rule.scalars(hp, lr, step, dtype, carry)
        self._next_carry = {k: v.to(torch.float32) for k, v in new_carry.items()}
        return packed

    def _update_shards(
        self,
        scalars: list[tuple[Tensor, Tensor]],
        grad_masks: list[Tensor | None],
        grad_scale: Tensor | None,
    ) -> list[Tensor]:
        """Update every owned shard; per buffer, the local squared norm of its gradient.

        ``scalars``: per buffer, the packed scalars on the host and on the device (see
        ``_update_scalars``); ``grad_scale``: the global-clip factor, on the device."""
        grad_sq = []
        for b, (buffer, state) in enumerate(zip(self.buffers, self.shard_states)):
            group = self.param_groups[self._buffer_groups[b]]
            host_scalars, device_scalars = scalars[b]
            device_grad_scale = None
            if grad_scale is not None:
                device_scalars[-GRAD_SCALE_FROM_END] = grad_scale.to(device_scalars.dtype)
                device_grad_scale = device_scalars[-GRAD_SCALE_FROM_END]
            # Note [no host sync in the step] (in ``functional``): the eager kernel takes its
            # floats from the host copy and the clip factor as a tensor.
            eager = functools.partial(
                shard_step_inplace_, host_scalars=host_scalars, grad_scale=device_grad_scale
            )
            hp = self._rule_hyperparameters(group)
            wanted = self._rule.slots(hp)
            if state.add_missing_slots_(
                wanted, buffer.shard.numel, _compute_dtype(buffer.dtype), buffer.device
            ):
                self._bind_param_state(b)
            decay_mask = self._decay.mask(b) if group["weight_decay"] != 0 else None
            grad_sq.append(
                self._runner(
                    shard_step_,
                    eager,
                    self._rule,
                    self._rule.static(hp),
                    buffer.shard_param,
                    buffer.shard_grad,
                    tuple(state.slots[name] for name in wanted),
                    state.ema,
                    state.master,
                    decay_mask,
                    grad_masks[b],
                    device_scalars,
                )
            )
        return grad_sq

    def _gather_params(self, overlap: bool = False) -> None:
        """Collective: every rank's updated shards reach every rank (see ``gather``)."""
        self._param_gather.gather(overlap)

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
        """Bytes this rank holds, by kind, and the most it held at once (``peak``).

        ``optimizer_state`` sums the sharded state (moments, AMSGrad maxima, EMA, fp32 master);
        ``grad_shards`` the reduced gradient shards with storage of their own (stage 2);
        ``full_grad_buffers`` the full flat gradient buffers (kept in one process and at stage
        1; at stage 2 those of the few buckets being gathered or reduced, lent from a pool
        that is emptied at the end of each step); ``late_grad_buffers`` gradients that arrived
        after their bucket's reduction started; ``comm_buffers`` the receive buffers of the
        ring and pairwise collectives in flight or kept within the step; ``param_buffers``
        the flat parameters (the model's). ``peak`` is the most bytes of all these held at
        once since construction or ``reset_memory_peak()``.
        """

        def nbytes(tensors: Iterable[Tensor | None]) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        states = self.shard_states
        kept_grads = nbytes(b.flat_grad for b in self.buffers if b.keep_full_grad)
        report = {
            "moments": nbytes(s.slots.get(k) for s in states for k in (MOMENTUM, VELOCITY)),
            "amsgrad_max": nbytes(s.slots.get(VELOCITY_HAT) for s in states),
            "ema": nbytes(s.ema for s in states),
            "master_weights": nbytes(s.master for s in states),
            "grad_shards": nbytes(b.shard_grad for b in self.buffers if not b.keep_full_grad),
            "full_grad_buffers": kept_grads + self._reducer.full_grad_nbytes(),
            "late_grad_buffers": self._reducer.late_nbytes(),
            "comm_buffers": self.comm.buffer_nbytes(),
            "param_buffers": nbytes(b.flat_param for b in self.buffers),
        }
        report["optimizer_state"] = sum(
            report[k] for k in ("moments", "amsgrad_max", "ema", "master_weights")
        )
        # Held throughout (allocated at construction, or lazily and then kept), plus the
        # most that the pools and late buffers lent at once.
        held = report["optimizer_state"] + report["grad_shards"] + kept_grads
        report["peak"] = held + report["param_buffers"] + self._memory_meter.peak_nbytes
        return report

    def reset_memory_peak(self) -> None:
        """Start ``memory_report()["peak"]`` again from what is held now."""
        self._memory_meter.reset_peak()

    # ------------------------------------------------------------------ the EMA

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict (see the class docstring), after any gather in flight."""
        self.wait_for_params()
        self._refresh_masters()
        return super().state_dict()

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

    def consolidated_state_dict(self, to_rank: int = 0) -> dict[str, Any] | None:
        """Collective: the state_dict one process would hold, on rank ``to_rank`` (None on the
        others), which loads at any world size (see ``state.consolidate_state_dict``)."""
        full = self.state_dict()
        if not self.comm.active:
            return full
        params = [p for g in self.param_groups for p in g["params"]]
        return consolidate_state_dict(
            full, self.comm, self.buffers, self.shard_states, params, self.options.name, to_rank
        )

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
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for key, value in saved.items():
                if key in ("params", LR_SCHEDULE_KEY):
                    continue
                if key in group:
                    value = merged_saved_value(self._rule, key, group[key], value)
                if key == "lr" and group[LR_SCHEDULE_KEY] is not None:
                    continue
                if key == "lr" and isinstance(group["lr"], Tensor):
                    group["lr"].fill_(float(value))  # keep the caller's tensor, new value
                    continue
                group[key] = value
        self._micro_steps = int(extra["micro_steps"])
        if self._carry:
            saved = extra.get("carry", _rule_carry(self._rule))
            self._carry = {
                k: torch.tensor(float(saved[k]), dtype=torch.float32) for k in self._carry
            }
            self._next_carry = self._carry
        self._reducer.reset()  # what was staged belongs to the state being replaced
        self._reducer.end_cycle()
        self._scheduled_lr = {}
        self._restore_shard_state(state_dict["state"], extra["name"])
        self._decay.excluded_indices = set(extra["weight_decay_excluded"])
        self._decay.patterns = list(extra["weight_decay_patterns"])
        self._has_names = all("param_names" in g for g in self.param_groups)
        self._rebuild_decay_masks()
        self._gather_params()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise what ``load_state_dict`` would refuse, changing nothing (not a collective:
        it checks only what this rank would load)."""
        extra = state_dict.get("shardadam")
        if extra is None or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError(
                f"load_state_dict() expects the state_dict() of a {type(self).__name__} (keys "
                f"'state', 'param_groups', 'shardadam'); got keys {sorted(state_dict)}"
            )
        self._check_compatible(state_dict, extra)
        if self._carry and set(extra.get("carry", {})) != set(self._carry):
            raise ValueError(
                f"the state_dict holds {sorted(extra.get('carry', {}))} as its optimizer-wide "
                f"state but {type(self).__name__} keeps {sorted(self._carry)}: it was saved by "
                "another optimizer"
            )
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        index_of = self._param_indices()
        for b, buffer in enumerate(self.buffers):
            group = self.param_groups[self._buffer_groups[b]]
            saved = saved_groups[self._buffer_groups[b]]
            merged = {
                **group,
                **{k: merged_saved_value(self._rule, k, group[k], v) for k, v in saved.items()
                   if k in group and k != "params"},
            }  # fmt: skip
            kinds = self._state_kinds(b, self._rule_hyperparameters(merged))
            for _ in saved_shard_pieces(buffer, kinds, saved_state, extra["name"], index_of):
                pass
        check_saved_accumulators(self.buffers, saved_state, extra["name"], index_of)
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            merged = {**group, **{k: v for k, v in saved.items() if k in group}}
            check_clip_exclusive(
                merged["clipnorm"],
                merged["clipvalue"],
                self.options.global_clipnorm,
                f" (param group {i} of the state_dict)",
            )

    def _check_compatible(self, state_dict: dict[str, Any], extra: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state_dict has {len(saved_groups)} param groups but this optimizer has "
                f"{len(self.param_groups)}"
            )
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            names = saved.get("param_names")
            if names is not None and len(names) != len(saved["params"]):
                raise ValueError(
                    f"param group {i} of the state_dict has {len(names)} param_names for "
                    f"{len(saved['params'])} parameters"
                )
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {i} has {len(group['params'])} parameters here but "
                    f"{len(saved['params'])} in the state_dict"
                )
        for option in ("use_ema", "gradient_accumulation_steps"):
            here, there = getattr(self.options, option), extra["options"][option]
            if here != there:
                raise ValueError(
                    f"the state_dict was saved with {option}={there!r} but this optimizer has "
                    f"{option}={here!r}; create the optimizer with the same {option}"
                )

    def _state_kinds(self, buffer_index: int, hp: dict[str, Any]) -> list[str]:
        """The kinds of state buffer ``buffer_index`` keeps once loaded with hyperparameters
        ``hp`` (Keras's names)."""
        shard_state = self.shard_states[buffer_index]
        kinds = list(self._rule.slots(hp))
        kinds += [AVERAGE] * (shard_state.ema is not None)
        return kinds + [MASTER] * (shard_state.master is not None)

    def _restore_shard_state(self, saved_state: dict[int, dict[str, Any]], saved_name: str) -> None:
        index_of = self._param_indices()
        for b, (buffer, shard_state) in enumerate(zip(self.buffers, self.shard_states)):
            hp = {**self._rule_hyperparameters(self.param_groups[self._buffer_groups[b]])}
            wanted = self._rule.slots(hp)
            shard_state.add_missing_slots_(
                wanted, buffer.shard.numel, _compute_dtype(buffer.dtype), buffer.device
            )
            for name in [n for n in shard_state.slots if n not in wanted]:
                del shard_state.slots[name]  # what the loaded state does not use
            entries = shard_state.entries()
            kinds = self._state_kinds(b, hp)
            pieces = saved_shard_pieces(buffer, kinds, saved_state, saved_name, index_of)
            for kind, local, source in pieces:
                if source is None:  # no fp32 master saved: start it from the parameters
                    source = buffer.shard_param[local.slice]
                entries[kind][local.slice].copy_(source)
            self._bind_param_state(b)
            if not self._reducer.starts_cycle:  # within a cycle: this rank's local sums
                sums = saved_accumulators(buffer, saved_state, saved_name, index_of)
                self._reducer.restore_accumulated(b, sums)


def _rule_carry(rule: ModuleType) -> dict[str, float]:
    return dict(getattr(rule, "CARRY", {}))


def _refuse_set(params: Any, where: str) -> None:
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            f"optimizer parameters{where} are given as a set, whose order can differ between "
            "runs and across ranks (parameters are matched by position); pass a list, e.g. "
            "list(model.parameters()) or model.named_parameters()"
        )


def _pack_shardadam_state(
    optimizer: ShardedOptimizer, state_dict: dict[str, Any]
) -> dict[str, Any]:
    """state_dict post-hook: drop code from the groups, add the optimizer-wide state."""
    for group in state_dict["param_groups"]:
        group[LR_SCHEDULE_KEY] = None
        without_code(optimizer._rule, group)
    if not optimizer._reducer.starts_cycle:
        # Note [accumulation without communication]: this rank's local gradient sums, whole
        # parameters, live in the flat gradient buffers; only those of parameters that
        # accumulated a gradient this cycle are stored (none at a cycle boundary).
        index_of = optimizer._param_indices()
        key = f"{optimizer.options.name}/{ACCUMULATOR}"
        for b, buffer in enumerate(optimizer.buffers):
            for index in sorted(optimizer._reducer.accumulated(b)):
                i = index_of[id(buffer.params[index])]
                sums = buffer.grad_views[index].clone()
                state_dict["state"][i] = {**state_dict["state"].get(i, {}), key: sums}
    state_dict["shardadam"] = {
        "name": optimizer.options.name,
        "micro_steps": optimizer._micro_steps,
        "iterations": optimizer.iterations,
        "world_size": optimizer.world_size,
        "options": dataclasses.asdict(optimizer.options),
        "weight_decay_excluded": sorted(optimizer._decay.excluded_indices),
        "weight_decay_patterns": list(optimizer._decay.patterns),
    }
    if optimizer._carry:
        state_dict["shardadam"]["carry"] = {k: float(v) for k, v in optimizer._carry.items()}
    return state_dict
