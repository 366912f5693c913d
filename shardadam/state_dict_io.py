"""The optimizer's ``state_dict``: what ``state_dict()`` adds to torch's (the ``shardadam``
entry, accumulated gradient sums), what ``load_state_dict`` checks before anything changes,
and how it restores the param groups and the shards' state.

The ``shardadam`` entry: ``name`` (the prefix of the state's keys), ``rule`` (the rule's
``NAME``; a state dict without it was saved by a version that had only Adam), ``micro_steps``,
``iterations``, ``world_size``, ``options``, ``weight_decay_excluded`` (indices in optimizer
order), ``weight_decay_patterns``, and ``carry`` for a rule with optimizer-wide state.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

from torch import Tensor

from .config import LR_SCHEDULE_KEY, OptimizerOptions, check_clip_exclusive
from .decay import DecayExclusions
from .param_groups import given_param_names, param_indices
from .reducer import GradReducer
from .rule_groups import hyperparameters_of, merged_saved_value, without_code
from .sharded_params import ShardedParams
from .state import (
    ACCUMULATOR,
    AVERAGE,
    MASTER,
    check_saved_accumulators,
    compute_dtype,
    consolidate_state_dict,
    rule_carry,
    saved_accumulators,
    saved_factored_pieces,
    saved_shard_pieces,
)

RULE_BEFORE_RULES = "Adam"
"""The rule of a state dict saved without ``rule``: earlier versions had only Adam."""


class StateDictIO:
    """Packs, checks and restores the state dict of an optimizer running ``rule`` over
    ``sharded``'s buffers (``owner``: the optimizer's class name, for the messages)."""

    def __init__(
        self,
        rule: ModuleType,
        sharded: ShardedParams,
        reducer: GradReducer,
        decay: DecayExclusions,
        options: OptimizerOptions,
        owner: str,
    ) -> None:
        self.rule = rule
        self.sharded = sharded
        self.reducer = reducer
        self.decay = decay
        self.options = options
        self.owner = owner

    def pack(
        self,
        state_dict: dict[str, Any],
        param_groups: list[dict[str, Any]],
        micro_steps: int,
        iterations: int,
        carry: dict[str, list[float]],
    ) -> dict[str, Any]:
        """torch's ``state_dict`` made ours: code dropped from the groups, this rank's gradient
        sums within an accumulation cycle, the ``shardadam`` entry."""
        for group in state_dict["param_groups"]:
            group[LR_SCHEDULE_KEY] = None
            without_code(self.rule, group)
        if not self.reducer.starts_cycle:
            # Note [accumulation without communication]: this rank's local gradient sums,
            # whole parameters, live in the flat gradient buffers; only those of parameters
            # that accumulated a gradient this cycle are stored (none at a cycle boundary).
            index_of = param_indices(param_groups)
            key = f"{self.options.name}/{ACCUMULATOR}"
            for b, buffer in enumerate(self.sharded.buffers):
                for index in sorted(self.reducer.accumulated(b)):
                    i = index_of[id(buffer.params[index])]
                    sums = buffer.grad_views[index].clone()
                    state_dict["state"][i] = {**state_dict["state"].get(i, {}), key: sums}
        state_dict["shardadam"] = {
            "name": self.options.name,
            "rule": self.rule.NAME,
            "micro_steps": micro_steps,
            "iterations": iterations,
            "world_size": self.sharded.comm.world_size,
            "options": dataclasses.asdict(self.options),
            "weight_decay_excluded": sorted(self.decay.excluded_indices),
            "weight_decay_patterns": list(self.decay.patterns),
        }
        if carry:
            state_dict["shardadam"]["carry"] = carry
        return state_dict

    def consolidated(
        self, full: dict[str, Any], param_groups: list[dict[str, Any]], to_rank: int
    ) -> dict[str, Any] | None:
        """Collective: this rank's ``full`` state_dict made the one a single process would
        hold, on rank ``to_rank`` (None on the others; see ``state.consolidate_state_dict``)."""
        comm = self.sharded.comm
        if not comm.active:
            return full
        params = [p for g in param_groups for p in g["params"]]
        buffers, shard_states = self.sharded.buffers, self.sharded.shard_states
        prefix = self.options.name
        factored = self._factored_layouts()
        return consolidate_state_dict(
            full, comm, buffers, shard_states, params, prefix, to_rank, factored
        )

    def _factored_layouts(self) -> list | None:
        """Per buffer, where a factored rule's rows and columns sit (None for another rule)."""
        stats = self.sharded.factored
        return (
            None if stats is None else [stats.layout(b) for b in range(len(self.sharded.buffers))]
        )

    def check(self, state_dict: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
        """Raise what loading ``state_dict`` would refuse, changing nothing (not a collective:
        it checks only what this rank would load)."""
        extra = state_dict.get("shardadam")
        if extra is None or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError(
                f"load_state_dict() expects the state_dict() of a {self.owner} (keys "
                f"'state', 'param_groups', 'shardadam'); got keys {sorted(state_dict)}"
            )
        self._check_rule(extra)
        self._check_compatible(state_dict, extra, param_groups)
        carry = rule_carry(self.rule)
        if carry and set(extra.get("carry", {})) != set(carry):
            raise ValueError(
                f"the state_dict holds {sorted(extra.get('carry', {}))} as its optimizer-wide "
                f"state but {self.owner} keeps {sorted(carry)}: it was saved by "
                "another optimizer"
            )
        for name, value in extra.get("carry", {}).items():
            if isinstance(value, (list, tuple)) and len(value) != len(param_groups):
                raise ValueError(
                    f"the state_dict holds {name!r} for {len(value)} param groups but this "
                    f"optimizer has {len(param_groups)}"
                )
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        index_of = param_indices(param_groups)
        for b, buffer in enumerate(self.sharded.buffers):
            group = param_groups[self.sharded.buffer_groups[b]]
            saved = saved_groups[self.sharded.buffer_groups[b]]
            merged = {
                **group,
                **{k: merged_saved_value(self.rule, k, group[k], v) for k, v in saved.items()
                   if k in group and k != "params"},
            }  # fmt: skip
            kinds = self._state_kinds(b, hyperparameters_of(self.rule, merged))
            for _ in saved_shard_pieces(buffer, kinds, saved_state, extra["name"], index_of):
                pass
            if self.sharded.factored is not None:
                layout = self.sharded.factored.layout(b)
                for _ in saved_factored_pieces(
                    buffer, layout, saved_state, extra["name"], index_of
                ):
                    pass
        check_saved_accumulators(self.sharded.buffers, saved_state, extra["name"], index_of)
        for i, (group, saved) in enumerate(zip(param_groups, saved_groups)):
            merged = {**group, **{k: v for k, v in saved.items() if k in group}}
            check_clip_exclusive(
                merged["clipnorm"],
                merged["clipvalue"],
                self.options.global_clipnorm,
                f" (param group {i} of the state_dict)",
            )

    def _check_rule(self, extra: dict[str, Any]) -> None:
        """A state saved by an optimizer of another rule holds other slots (or the same names
        with another meaning): refuse it, naming the member of the family that loads it."""
        saved = extra.get("rule", RULE_BEFORE_RULES)
        if saved != self.rule.NAME:
            raise ValueError(
                f"the state_dict was saved by a Sharded{saved} (rule {saved!r}) but this is a "
                f"{self.owner} (rule {self.rule.NAME!r}); load it into a Sharded{saved}"
            )

    def _check_compatible(
        self,
        state_dict: dict[str, Any],
        extra: dict[str, Any],
        param_groups: list[dict[str, Any]],
    ) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(param_groups):
            raise ValueError(
                f"the state_dict has {len(saved_groups)} param groups but this optimizer has "
                f"{len(param_groups)}"
            )
        for i, (group, saved) in enumerate(zip(param_groups, saved_groups)):
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

    def load(self, state_dict: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
        """Restore the param groups, the shards' state and the weight-decay exclusions from a
        checked ``state_dict`` (the reducer's cycle already that of the saved micro-step)."""
        extra = state_dict["shardadam"]
        self._load_groups(state_dict["param_groups"], param_groups)
        self._restore_shards(state_dict["state"], extra["name"], param_groups)
        self.decay.excluded_indices = set(extra["weight_decay_excluded"])
        self.decay.patterns = list(extra["weight_decay_patterns"])
        self.decay.rebuild_masks(param_indices(param_groups), given_param_names(param_groups))

    def _load_groups(
        self, saved_groups: list[dict[str, Any]], param_groups: list[dict[str, Any]]
    ) -> None:
        """The saved hyperparameters win, as in torch; schedules and callables are code, not
        state: the optimizer keeps its own (and a learning-rate tensor, with the new value)."""
        for group, saved in zip(param_groups, saved_groups):
            for key, value in saved.items():
                if key in ("params", LR_SCHEDULE_KEY):
                    continue
                if key in group:
                    value = merged_saved_value(self.rule, key, group[key], value)
                if key == "lr" and group[LR_SCHEDULE_KEY] is not None:
                    continue
                if key == "lr" and isinstance(group["lr"], Tensor):
                    group["lr"].fill_(float(value))  # keep the caller's tensor, new value
                    continue
                group[key] = value

    def _restore_shards(
        self,
        saved_state: dict[int, dict[str, Any]],
        saved_name: str,
        param_groups: list[dict[str, Any]],
    ) -> None:
        """Each buffer's shard state from the saved one, and within an accumulation cycle
        this rank's gradient sums."""
        index_of = param_indices(param_groups)
        sharded = self.sharded
        for b, (buffer, shard_state) in enumerate(zip(sharded.buffers, sharded.shard_states)):
            hp = hyperparameters_of(self.rule, param_groups[sharded.buffer_groups[b]])
            wanted = self.rule.slots(hp)
            shard_state.add_missing_slots_(
                wanted, buffer.shard.numel, compute_dtype(buffer.dtype), buffer.device
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
            if sharded.factored is not None:
                layout = sharded.factored.layout(b)
                for kind, local, source in saved_factored_pieces(
                    buffer, layout, saved_state, saved_name, index_of
                ):
                    shard_state.factored[kind][local.slice].copy_(source)
            sharded.bind(b)
            if not self.reducer.starts_cycle:  # within a cycle: this rank's local sums
                sums = saved_accumulators(buffer, saved_state, saved_name, index_of)
                self.reducer.restore_accumulated(b, sums)

    def _state_kinds(self, buffer_index: int, hp: dict[str, Any]) -> list[str]:
        """The kinds of state buffer ``buffer_index`` keeps once loaded with hyperparameters
        ``hp`` (Keras's names)."""
        shard_state = self.sharded.shard_states[buffer_index]
        kinds = list(self.rule.slots(hp))
        kinds += [AVERAGE] * (shard_state.ema is not None)
        return kinds + [MASTER] * (shard_state.master is not None)
