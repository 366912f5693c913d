"""The update phase of a step: the shard gradients made ready, this step's packed scalars for
each buffer, then each owned shard updated by the rule with Keras's clipping, weight decay,
masks, EMA and masters around it (one kernel call per buffer, see ``functional``).

The rule's optimizer-wide state (``CARRY``: Nadam's ``u_product``) lives here too, one per
param group (a group is torch's counterpart of a separate Keras optimizer, and the product
depends on the group's ``beta_1``): the scalars say what it becomes, and it advances once per
applied update, never on a skipped one. A group added later starts from the first group's.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .config import OptimizerOptions
from .decay import DecayExclusions
from .factored import FACTORED_ROWS
from .functional import (
    ENGINE_SCALARS,
    GRAD_SCALE_FROM_END,
    engine_scalars,
    host_scalar,
    shard_row_col_terms,
    shard_step_,
    shard_step_inplace_,
    shard_tensor_terms,
)
from .kernels import UpdateRunner
from .rule_groups import hyperparameters_of
from .sharded_params import ShardedParams
from .state import compute_dtype, rule_carry
from .tensor_stats import TensorStatistics


def _initial_carry(rule: ModuleType) -> dict[str, Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in rule_carry(rule).items()}


Scalars = list[tuple[Tensor, Tensor]]
"""Per buffer, the packed scalars of a step in host memory and on the buffer's device."""


class ShardUpdater:
    """Updates the owned shards of ``sharded``'s buffers with ``rule``.

    ``param_groups`` is the optimizer's list, read at every step (each buffer's group gives
    its weight decay, clipvalue and the rule's hyperparameters); ``decay`` gives the masks of
    the parameters weight decay skips; ``runner`` runs the update compiled or eagerly.
    """

    def __init__(
        self,
        rule: ModuleType,
        sharded: ShardedParams,
        param_groups: list[dict[str, Any]],
        decay: DecayExclusions,
        runner: UpdateRunner,
        options: OptimizerOptions,
    ) -> None:
        self.rule = rule
        self.sharded = sharded
        self.param_groups = param_groups
        self.decay = decay
        self.runner = runner
        self.options = options
        self.tensor_stats = (
            TensorStatistics(sharded.comm, sharded.buffers)
            if hasattr(rule, "TENSOR_STATS")
            else None
        )
        """Sums over each tensor across ranks, for a per-tensor rule (Lamb)."""
        self.carry: list[dict[str, Tensor]] = []
        """Per param group, the rule's optimizer-wide state (Nadam's u_product), float32 as
        Keras keeps it; empty dicts for a rule without any."""
        self.next_carry: dict[int, dict[str, Tensor]] = {}
        """Per group, what its carry becomes once this step's update is applied."""
        self.absent: list[set[int]] = []
        """Per buffer, the parameters without a gradient at this step (``prepare_grads``)."""

    def prepare_grads(self, present: list[list[int]]) -> list[Tensor | None]:
        """Unscale and average the accumulated shard gradients; the masks of present ones
        (``present``: per buffer, the indices of the parameters with a gradient).

        Keras: g = (g + sum of earlier micro-step gradients) / steps / loss_scale_factor. A
        parameter without a gradient at this step is skipped, its accumulated sum dropped (as
        Keras does), so that it adds nothing to the norms that clipping uses either.
        """
        steps = self.options.gradient_accumulation_steps
        divisor = (self.options.loss_scale_factor or 1.0) * (steps or 1)
        masks = []
        self.absent = [
            set(range(len(b.params))) - set(h) for b, h in zip(self.sharded.buffers, present)
        ]
        for buffer, have in zip(self.sharded.buffers, present):
            mask = None if len(have) == len(buffer.params) else buffer.shard_mask(have)
            if divisor != 1.0:
                buffer.shard_grad.div_(divisor)
            if steps and mask is not None:
                buffer.shard_grad.mul_(mask)
            masks.append(mask)
        return masks

    def scalars(
        self,
        per_group: list[tuple[float | Tensor, dict[str, Any]]],
        step: int,
        ema_momentum: float,
        ema_overwrite: bool,
    ) -> Scalars:
        """Per buffer, the packed scalars of this step (the rule's, then the engine's): in host
        memory (the eager kernel's floats) and on the buffer's device (Note [no host sync in
        the step] in ``functional``).

        ``per_group``: each param group's (learning rate, the rule's hyperparameters by Keras
        name, evaluated); ``step``: the 1-based count of applied updates (Keras's
        ``iterations + 1``); ``ema_momentum``, ``ema_overwrite``: the EMA's of this step.
        """
        scalars = []
        for b, buffer in enumerate(self.sharded.buffers):
            group_index = self.sharded.buffer_groups[b]
            group = self.param_groups[group_index]
            lr, hp = per_group[group_index]
            dtype = compute_dtype(buffer.dtype)
            lr_tensor = host_scalar(lr, dtype)
            packed = torch.cat(
                [
                    self._rule_scalars(hp, lr_tensor, step, dtype, group_index),
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

    def _rule_scalars(
        self, hp: dict[str, Any], lr: Tensor, step: int, dtype: torch.dtype, group_index: int
    ) -> Tensor:
        """The rule's packed scalars of this step; a rule with optimizer-wide state also says
        what the group's state becomes, which the step keeps once the update is applied."""
        if not hasattr(self.rule, "CARRY"):
            return self.rule.scalars(hp, lr, step, dtype)
        carry = {k: v.to(dtype) for k, v in self._group_carry(group_index).items()}
        packed, new_carry = self.rule.scalars(hp, lr, step, dtype, carry)
        self.next_carry[group_index] = {k: v.to(torch.float32) for k, v in new_carry.items()}
        return packed

    def _group_carry(self, group_index: int) -> dict[str, Tensor]:
        while len(self.carry) <= group_index:  # a new group: the first group's (or the start)
            start = self.carry[0] if self.carry else _initial_carry(self.rule)
            self.carry.append({k: v.clone() for k, v in start.items()})
        return self.carry[group_index]

    def update_shards(
        self,
        scalars: Scalars,
        grad_masks: list[Tensor | None],
        grad_scale: Tensor | None,
    ) -> list[Tensor]:
        """Collective for a per-tensor rule: update every owned shard; per buffer, the local
        squared norm of its gradient.

        ``scalars``: from ``scalars()``; ``grad_masks``: from ``prepare_grads()``;
        ``grad_scale``: the global-clip factor, on the device (None without global clipping).
        """
        calls = self._kernel_calls(scalars, grad_masks, grad_scale)
        if self.tensor_stats is None:
            return [self.runner(shard_step_, eager, *args) for eager, args in calls]
        # One [rows, shard numel] tensor per buffer: a factored rule's rows, then the rule's
        # per-tensor factors, each phase writing its own rows (no copies between them).
        first = 0 if self.sharded.factored is None else len(FACTORED_ROWS)
        rows = first + len(self.rule.TENSOR_FACTORS)
        factors = [
            torch.empty(
                rows, args[2].numel(), dtype=compute_dtype(args[2].dtype), device=args[2].device
            )
            for _, args in calls
        ]
        if self.sharded.factored is not None:
            self._factored_factors(calls, [f[:first] for f in factors])
        self._tensor_factors(calls, factors, first)
        return [
            self.runner(shard_step_, eager, *args, f) for (eager, args), f in zip(calls, factors)
        ]

    def _tensor_factors(
        self, calls: list[tuple[Any, tuple]], factors: list[Tensor], first: int
    ) -> None:
        """Note [per-tensor statistics] (in ``functional``): per buffer, each element's factors
        from the rule's terms summed over its tensor on every rank (one all-reduce), written
        into rows ``first:`` of ``factors``; the rows before (a factored rule's) are the terms'
        input."""
        terms = []
        for (_, args), out in zip(calls, factors):
            extra = (out[:first],) if first else ()
            inputs = _terms_inputs(args)
            terms.append(self.runner(shard_tensor_terms, shard_tensor_terms, *inputs, *extra))
        sums = self.tensor_stats.sum_per_tensor(terms)
        for buffer, per_tensor, (_, args), out in zip(self.sharded.buffers, sums, calls, factors):
            static, device_scalars = args[1], args[-1]
            sizes = self.tensor_stats.sizes(buffer, per_tensor.dtype)
            per_tensor = self.rule.tensor_factors(
                per_tensor, sizes, device_scalars[:-ENGINE_SCALARS], static
            )
            self.tensor_stats.per_element(buffer, per_tensor, out=out[first:])

    def _factored_factors(self, calls: list[tuple[Any, tuple]], factors: list[Tensor]) -> None:
        """Note [factored state] (in ``factored``): advance each buffer's row and column state
        from the means of the rule's terms (one all-reduce), then write into ``factors[b]``
        (``FACTORED_ROWS``) each element's product of its row's and column's values (the rows'
        matrix means: one more) and a 0/1 mask of the factored elements. Parameters without a
        gradient keep their rows and columns."""
        stats = self.sharded.factored
        terms = [
            self.runner(shard_row_col_terms, shard_row_col_terms, *_terms_inputs(args))
            for _, args in calls
        ]
        means = stats.row_col_means(terms)
        new_state = []
        for b, ((row_means, col_means), (_, args)) in enumerate(zip(means, calls)):
            state, layout = self.sharded.shard_states[b].factored, stats.layout(b)
            rule_scalars = args[-1][:-ENGINE_SCALARS]
            r, c = self.rule.factored_state(
                state["r"], state["c"], row_means, col_means, rule_scalars, args[1]
            )
            layout.keep_(self.absent[b], r, state["r"], "rows")
            layout.keep_(self.absent[b], c, state["c"], "columns")
            new_state.append((r, c))
        matrix_means = stats.matrix_means([r for r, _ in new_state])
        for b, ((r, c), r_means, (_, args), out) in enumerate(
            zip(new_state, matrix_means, calls, factors)
        ):
            state, layout = self.sharded.shard_states[b].factored, stats.layout(b)
            rows, columns = self.rule.factored_values(
                r, c, r_means, args[-1][:-ENGINE_SCALARS], args[1]
            )
            layout.outer(rows, columns, out=out[0])
            out[1].copy_(layout.mask(out.shape[1], out.dtype))
            state["r"].copy_(r)
            state["c"].copy_(c)

    def _kernel_calls(
        self,
        scalars: Scalars,
        grad_masks: list[Tensor | None],
        grad_scale: Tensor | None,
    ) -> list[tuple[Any, tuple]]:
        """Per buffer, the eager kernel and the arguments of ``shard_step_``."""
        calls = []
        for b, (buffer, state) in enumerate(zip(self.sharded.buffers, self.sharded.shard_states)):
            group = self.param_groups[self.sharded.buffer_groups[b]]
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
            hp = hyperparameters_of(self.rule, group)
            slots = self.sharded.slots(b, self.rule.slots(hp))
            decay_mask = self.decay.mask(b) if group["weight_decay"] != 0 else None
            args = (
                self.rule,
                self.rule.static(hp),
                buffer.shard_param,
                buffer.shard_grad,
                slots,
                state.ema,
                state.master,
                decay_mask,
                grad_masks[b],
                device_scalars,
            )
            calls.append((eager, args))
        return calls

    def advance_carry(self) -> None:
        """The update was applied: each group's optimizer-wide state takes its next value."""
        for group_index, carry in self.next_carry.items():
            self.carry[group_index] = carry
        self.next_carry = {}

    def carry_values(self) -> dict[str, list[float]]:
        """The rule's optimizer-wide state as floats, one per param group, for the state dict
        ({} for a rule without any)."""
        if not hasattr(self.rule, "CARRY"):
            return {}
        per_group = [self._group_carry(g) for g in range(len(self.param_groups))]
        return {k: [float(c[k]) for c in per_group] for k in rule_carry(self.rule)}

    def load_carry(self, saved: dict[str, float | list[float]] | None) -> None:
        """Take the saved optimizer-wide state (None: the rule's initial one); one value for
        every group (as saved before it was kept per group) or one per group."""
        if not hasattr(self.rule, "CARRY"):
            return
        saved = rule_carry(self.rule) if saved is None else saved
        self.carry = [
            {
                k: torch.tensor(
                    float(v[g] if isinstance(v, (list, tuple)) else v), dtype=torch.float32
                )
                for k, v in saved.items()
            }
            for g in range(len(self.param_groups))
        ]
        self.next_carry = {}


def _terms_inputs(args: tuple) -> tuple:
    """``shard_step_``'s arguments as the terms kernels take them (no EMA)."""
    rule, static, param, grad, slots, _ema, master, decay_mask, grad_mask, scalars = args
    return (rule, static, param, grad, slots, master, decay_mask, grad_mask, scalars)
