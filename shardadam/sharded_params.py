"""The parameters as the engine holds them: each param group's parameters, by dtype, packed in
flat buffers (buckets of about ``bucket_cap_mb`` across ranks), each buffer with the state of
the shard this rank owns, and the optimizer's ``state`` as views of that state."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .buffers import FlatBuffer
from .comm import Communicator
from .config import OptimizerOptions, ShardingOptions
from .factored import FactoredStatistics
from .functional import refresh_master_
from .layout import build_layout
from .rule_groups import hyperparameters_of
from .state import ShardState, bind_param_state, compute_dtype


def sharding_options_of(owner: str, arguments: dict[str, Any]) -> ShardingOptions:
    """The sharding options among an optimizer's keyword arguments (``owner``: its class
    name); any other argument is one it does not take."""
    known = {f.name for f in dataclasses.fields(ShardingOptions)}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise ValueError(
            f"Argument(s) not recognized: {unknown} ({owner} takes Keras's "
            f"{owner.removeprefix('Sharded')} arguments, process_group, and the sharding "
            f"options {sorted(known)})"
        )
    return ShardingOptions(**arguments)


class ShardedParams:
    """The flat buffers of every param group and the state of this rank's shard of each.

    ``buffers``, ``shard_states``, ``buffer_groups`` (each buffer's param group) and
    ``position_of`` (id(parameter) -> (buffer index, index in the buffer)) are parallel and
    only grow; the other parts of the engine are handed these lists and read them at each
    call. ``param_state`` is what the optimizer exposes as ``state``: per parameter, views of
    what this rank owns of it, under ``"<name>/<slot>"``.
    """

    def __init__(
        self,
        comm: Communicator,
        sharding: ShardingOptions,
        rule: ModuleType,
        options: OptimizerOptions,
    ) -> None:
        self.comm = comm
        self.sharding = sharding
        self.rule = rule
        self.prefix = options.name
        self.use_ema = options.use_ema
        self.buffers: list[FlatBuffer] = []
        self.shard_states: list[ShardState] = []
        self.buffer_groups: list[int] = []
        self.position_of: dict[int, tuple[int, int]] = {}
        self.param_state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        self.factored = (
            FactoredStatistics(comm, self.buffers) if hasattr(rule, "FACTORED_SLOTS") else None
        )
        """A factored rule's rows and columns of each buffer (Note [factored state])."""

    def add_group(
        self, group_index: int, group: dict[str, Any], names: list[str], ema_started: bool
    ) -> range:
        """Collective when sharded (the ranks agree on the parameters): lay out a new param
        group's parameters in new buffers with their shard state; returns the new buffers'
        indices. ``ema_started``: an EMA starts at the parameters, not at zero (Keras takes
        the parameters at step 1; a group added later starts from its current values)."""
        self._check_ranks_agree(group_index, names, group["params"])
        by_dtype: dict[torch.dtype, list[tuple[str, Tensor]]] = {}
        for name, p in zip(names, group["params"]):
            by_dtype.setdefault(p.dtype, []).append((name, p))
        # Note [gradient storage per stage]
        keep_full_grad = self.sharding.stage == 1 or not self.comm.active
        first = len(self.buffers)
        for named in (b for same_dtype in by_dtype.values() for b in self._buckets(same_dtype)):
            layout = build_layout(
                [tuple(p.shape) for _, p in named],
                [n for n, _ in named],
                self.comm.world_size,
                self.sharding.align_numel,
            )
            buffer = FlatBuffer([p for _, p in named], layout, self.comm.rank, keep_full_grad)
            b = len(self.buffers)
            self.buffers.append(buffer)
            self.buffer_groups.append(group_index)
            self.shard_states.append(self._new_shard_state(b, group, ema_started))
            self.bind(b)
            self.position_of.update((id(p), (b, i)) for i, p in enumerate(buffer.params))
        return range(first, len(self.buffers))

    def bind(self, buffer_index: int) -> None:
        """Point ``param_state[p]`` at views of the shard state (what this rank owns of p)."""
        buffer, shard_state = self.buffers[buffer_index], self.shard_states[buffer_index]
        layout = None if self.factored is None else self.factored.layout(buffer_index)
        bind_param_state(self.param_state, buffer, shard_state, self.prefix, layout)

    def slots(self, buffer_index: int, wanted: dict[str, float]) -> tuple[Tensor, ...]:
        """The buffer's shard slots named in ``wanted`` ({name: initial value}), in its order;
        those not kept yet are added at their initial value (a hyperparameter changed the
        rule's structure, e.g. amsgrad switched on)."""
        buffer, state = self.buffers[buffer_index], self.shard_states[buffer_index]
        dtype = compute_dtype(buffer.dtype)
        if state.add_missing_slots_(wanted, buffer.shard.numel, dtype, buffer.device):
            self.bind(buffer_index)
        return tuple(state.slots[name] for name in wanted)

    def owned_range(self, param: Tensor) -> tuple[int, int] | None:
        """Elements [start, end) of the flattened ``param`` whose state this rank holds (the
        whole parameter in one process), or None where another rank owns all of it."""
        position = self.position_of.get(id(param))
        if position is None:
            raise ValueError(
                f"owned_range(): the tensor of shape {tuple(param.shape)} is not optimized here"
            )
        b, index = position
        piece = self.buffers[b].piece_of(index)
        return None if piece is None else (piece.param.start, piece.param.end)

    def missing_grad_names(self, present: list[list[int]], index_of: dict[int, int]) -> list[str]:
        """Names of the trainable parameters without a gradient (``present``: per buffer, the
        indices of those with one), in optimizer order (``index_of``: id -> that order)."""
        missing = []
        for buffer, have in zip(self.buffers, present):
            if len(have) < len(buffer.params):
                have = set(have)
                missing += [
                    (index_of[id(p)], span.name)
                    for span, p in zip(buffer.layout.params, buffer.params)
                    if p.requires_grad and span.index not in have
                ]
        return [name for _, name in sorted(missing)]

    def check_in_place(self, owner: str) -> None:
        """Raise if a parameter stopped being a view of its flat buffer (the model was
        converted or moved after the optimizer was built): its updates would be lost."""
        for buffer in self.buffers:
            index = buffer.first_detached()
            if index is not None:
                span, p = buffer.layout.params[index], buffer.params[index]
                raise RuntimeError(
                    f"parameter '{span.name}' ({p.dtype} on {p.device}) is no longer a view of "
                    f"{owner}'s flat {buffer.dtype} buffer on {buffer.device}: "
                    "the model was converted or moved after the optimizer was built "
                    "(model.double(), .to(device), .to(memory_format=...)), so step() could not "
                    "change it; "
                    "build the optimizer after moving or converting the model"
                )

    def refresh_masters(self) -> None:
        """Note [parameters changed outside the optimizer]: a bf16/fp16 parameter that no
        longer equals its rounded fp32 master (a loaded state_dict or checkpoint, a
        re-initialisation) is taken as it is now, as an fp32 parameter would be."""
        for buffer, state in zip(self.buffers, self.shard_states):
            if state.master is not None:
                refresh_master_(state.master, buffer.shard_param)

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
            where = f"rank {self.comm.rank}/{self.comm.world_size}: param group {group_index}: "
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

    def _new_shard_state(self, b: int, group: dict[str, Any], ema_started: bool) -> ShardState:
        buffer = self.buffers[b]
        dtype = compute_dtype(buffer.dtype)

        def zeros() -> Tensor:
            return torch.zeros(buffer.shard.numel, dtype=dtype, device=buffer.device)

        slots = self.rule.slots(hyperparameters_of(self.rule, group))
        state = ShardState(slots={name: torch.full_like(zeros(), v) for name, v in slots.items()})
        if dtype != buffer.dtype:
            state.master = buffer.shard_param.to(dtype)
        if self.use_ema:
            weights = buffer.shard_param if state.master is None else state.master
            state.ema = weights.to(dtype, copy=True) if ema_started else zeros()
        if self.factored is not None:
            state.factored = self.factored.new_state(b, dtype)
        return state
