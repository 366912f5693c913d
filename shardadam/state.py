"""The optimizer state of a rank's shards, and the names it carries in state dicts."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .buffers import FlatBuffer
from .comm import Communicator
from .factored import FactoredLayout, factored_shapes, is_factored, owned, touched
from .layout import Range

# Names of the per-parameter state entries (after the "<name>/" prefix), as Keras names them.
MOMENTUM, VELOCITY, VELOCITY_HAT = "momentum", "velocity", "velocity_hat"
AVERAGE, MASTER, ACCUMULATOR = "average", "master", "gradient_accumulator"
OWNED_RANGE = "owned_range"


def rule_carry(rule: Any) -> dict[str, float]:
    """A rule's optimizer-wide state (``CARRY``) at the start; {} for a rule without any."""
    return dict(getattr(rule, "CARRY", {}))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a buffer of ``dtype`` keeps its state and runs its update in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass
class ShardState:
    """The optimizer state of one buffer's owned shard, in the compute dtype."""

    slots: dict[str, Tensor]
    """The update rule's state, by Keras's variable name, in the rule's order."""
    ema: Tensor | None = None
    master: Tensor | None = None
    """fp32 copy of a low-precision shard; the update runs on it."""
    factored: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    """A factored rule's row and column state of the shard's pieces (Note [factored state]
    in ``factored``), by kind; not shaped like the shard."""

    def entries(self) -> dict[str, Tensor]:
        named = {**self.slots, AVERAGE: self.ema, MASTER: self.master}
        return {k: v for k, v in named.items() if v is not None}

    def add_missing_slots_(
        self, wanted: dict[str, float], numel: int, dtype: torch.dtype, device: torch.device
    ) -> bool:
        """Add the slots of ``wanted`` ({name: initial value}) not kept yet, at their initial
        value (a hyperparameter changed the rule's structure, e.g. amsgrad switched on); slots
        no longer wanted stay, as torch's optimizers keep them. True if one was added."""
        missing = [name for name in wanted if name not in self.slots]
        for name in missing:
            self.slots[name] = torch.full((numel,), wanted[name], dtype=dtype, device=device)
        return bool(missing)


def bind_param_state(
    state: dict[Tensor, dict[str, Any]],
    buffer: FlatBuffer,
    shard_state: ShardState,
    prefix: str,
    factored: FactoredLayout | None = None,
) -> None:
    """Point ``state[p]`` (the optimizer's ``self.state``) at views of the shard state: what
    this rank owns of each parameter of ``buffer``, under ``"<prefix>/<kind>"``; a factored
    rule's rows and columns (``factored``: where they sit) shaped as Keras's variables for a
    whole parameter, else flat: the rows and columns its elements touch."""
    for span, p in zip(buffer.layout.params, buffer.params):
        piece = buffer.piece_of(span.index)
        entry: dict[str, Any] = {}
        if piece is not None:
            whole = piece.param.numel == span.flat.numel
            for key, tensor in shard_state.entries().items():
                view = tensor[piece.local.slice]
                entry[f"{prefix}/{key}"] = view.view(span.shape) if whole else view
            if not whole:
                entry[f"{prefix}/{OWNED_RANGE}"] = (piece.param.start, piece.param.end)
        state[p] = entry
    for piece in factored.pieces if factored is not None else ():
        entry = state[buffer.params[piece.param_index]]
        shapes = factored_shapes(piece.shape)
        for kind, entries in (("r", piece.rows), ("c", piece.columns)):
            view = shard_state.factored[kind][entries.slice]
            entry[f"{prefix}/{kind}"] = view.view(shapes[kind]) if piece.whole else view


def saved_shard_pieces(
    buffer: FlatBuffer,
    kinds: list[str],
    saved_state: dict[int, dict[str, Any]],
    saved_name: str,
    index_of: dict[int, int],
) -> Iterator[tuple[str, Range, Tensor | None]]:
    """(state kind, elements of the shard, saved values or None) for each of ``kinds`` and each
    parameter of ``buffer`` this rank owns; raises on what is missing or does not fit. None
    only for a missing fp32 master (rebuilt from the parameters)."""
    for span, p in zip(buffer.layout.params, buffer.params):
        piece = buffer.piece_of(span.index)
        if piece is None:
            continue
        saved = saved_state.get(index_of[id(p)], {})
        for kind in kinds:
            source = saved.get(f"{saved_name}/{kind}")
            if source is None and kind != MASTER:
                raise ValueError(
                    f"the state_dict has no '{saved_name}/{kind}' for parameter "
                    f"'{span.name}' (shape {span.shape}), which this optimizer needs"
                )
            if source is not None:
                source = _owned_piece(source, saved, saved_name, span, piece.param)
            yield kind, piece.local, source


def saved_factored_pieces(
    buffer: FlatBuffer,
    factored: FactoredLayout,
    saved_state: dict[int, dict[str, Any]],
    saved_name: str,
    index_of: dict[int, int],
) -> Iterator[tuple[str, Range, Tensor]]:
    """(kind, entries of the rank's vector of that kind, saved values) of a factored rule's
    row and column state, for each factored piece this rank holds; raises on what is missing
    or does not fit (Note [factored state] in ``factored``)."""
    for piece in factored.pieces:
        span = buffer.layout.params[piece.param_index]
        saved = saved_state.get(index_of[id(buffer.params[piece.param_index])], {})
        shapes, wanted = factored_shapes(span.shape), touched(span.shape, piece.elements)
        for kind, entries in (("r", piece.rows), ("c", piece.columns)):
            source = saved.get(f"{saved_name}/{kind}")
            if source is None:
                raise ValueError(
                    f"the state_dict has no '{saved_name}/{kind}' for parameter "
                    f"'{span.name}' (shape {span.shape}), which this optimizer needs"
                )
            if saved.get(f"{saved_name}/{OWNED_RANGE}") is None:  # the whole tensor's
                if tuple(source.shape) != shapes[kind]:
                    raise ValueError(
                        f"'{saved_name}/{kind}' for parameter '{span.name}' has shape "
                        f"{tuple(source.shape)} in the state_dict but {shapes[kind]} is "
                        f"expected for a parameter of shape {span.shape}"
                    )
                source = source.reshape(-1)[wanted[kind].slice]
            elif source.numel() != entries.numel:  # the owned range was checked with the slots
                raise ValueError(
                    f"'{saved_name}/{kind}' for parameter '{span.name}' holds {source.numel()} "
                    f"values in the state_dict but this rank keeps {entries.numel}"
                )
            yield kind, entries, source.reshape(-1)


def check_saved_accumulators(
    buffers: list[FlatBuffer],
    saved_state: dict[int, dict[str, Any]],
    saved_name: str,
    index_of: dict[int, int],
) -> None:
    """Raise if a saved gradient sum does not have its parameter's shape."""
    key = f"{saved_name}/{ACCUMULATOR}"
    for buffer in buffers:
        for span, p in zip(buffer.layout.params, buffer.params):
            source = saved_state.get(index_of[id(p)], {}).get(key)
            if source is not None:  # absent: no gradient accumulated this cycle
                _check_shape(source, span, key)


def saved_accumulators(
    buffer: FlatBuffer,
    saved_state: dict[int, dict[str, Any]],
    saved_name: str,
    index_of: dict[int, int],
) -> dict[int, Tensor]:
    """This rank's saved gradient sums of ``buffer``'s parameters, by index in the buffer
    (those saved: a parameter without one accumulated nothing)."""
    key = f"{saved_name}/{ACCUMULATOR}"
    sums = {}
    for index, p in enumerate(buffer.params):
        values = saved_state.get(index_of[id(p)], {}).get(key)
        if values is not None:
            sums[index] = values
    return sums


def _owned_piece(
    source: Tensor, saved: dict[str, Any], saved_name: str, span: Any, owned: Any
) -> Tensor:
    """The elements ``owned`` (of the flattened parameter) from a saved state tensor."""
    saved_range = saved.get(f"{saved_name}/{OWNED_RANGE}")
    if saved_range is None:
        _check_shape(source, span, "state")
        return source.reshape(-1)[owned.slice]
    if tuple(saved_range) != (owned.start, owned.end):
        raise ValueError(
            f"the state_dict holds elements {tuple(saved_range)} of parameter '{span.name}' but "
            f"this rank owns {(owned.start, owned.end)}; it was saved at another world size: "
            "load it through shardadam.checkpoint, which reshards"
        )
    return source.reshape(-1)


def _check_shape(source: Tensor, span: Any, what: str) -> None:
    if tuple(source.shape) != tuple(span.shape):
        raise ValueError(
            f"{what} for parameter '{span.name}' has shape {tuple(source.shape)} in the "
            f"state_dict but the parameter has shape {span.shape}"
        )


def consolidate_state_dict(
    full: dict[str, Any],
    comm: Communicator,
    buffers: list[FlatBuffer],
    shard_states: list[ShardState],
    params: list[Tensor],
    prefix: str,
    to_rank: int,
    factored: list[FactoredLayout | None] | None = None,
) -> dict[str, Any] | None:
    """Collective: turn this rank's ``full`` state_dict into the one a single process would
    hold, on rank ``to_rank`` (None on the others). ``params``: in optimizer order;
    ``factored``: per buffer, where a factored rule's rows and columns sit.

    Streams one buffer and one kind of state at a time (each message at most a bucket), never
    the whole model's state at once. Accumulated gradients become the mean of the ranks' local
    sums, which is what one process would have summed.
    """
    index_of = {id(p): i for i, p in enumerate(params)}
    state: dict[int, dict[str, Any]] = {}
    for buffer, shard_state in zip(buffers, shard_states):
        for key, shard in shard_state.entries().items():
            gathered = comm.gather_to(shard.contiguous(), to_rank)
            if gathered is None:
                continue
            for span, p in zip(buffer.layout.params, buffer.params):
                entry = state.setdefault(index_of[id(p)], {})
                entry[f"{prefix}/{key}"] = gathered[span.flat.slice].view(span.shape).clone()
    for buffer, layout, shard_state in zip(buffers, factored or [], shard_states):
        if layout is not None:
            _consolidate_factored(
                state, comm, buffer, layout, shard_state, index_of, prefix, to_rank
            )
    # Ranks accumulated gradients for different parameters: reduce those of any rank.
    accumulator = f"{prefix}/{ACCUMULATOR}"
    device = params[0].device if params else None
    has_sums = torch.zeros(len(params), dtype=torch.int32, device=device)
    for i, entry in full["state"].items():
        has_sums[i] = accumulator in entry
    comm.all_reduce_max_(has_sums)
    for i in torch.nonzero(has_sums).flatten().tolist():
        sums = full["state"].get(i, {}).get(accumulator)
        sums = torch.zeros_like(params[i]) if sums is None else sums.clone()
        comm.reduce_sum_to_(sums, to_rank)
        state.setdefault(i, {})[accumulator] = sums / comm.world_size
    if comm.rank != to_rank:
        return None
    full["state"] = state
    full["shardadam"]["world_size"] = 1
    return full


def _consolidate_factored(
    state: dict[int, dict[str, Any]],
    comm: Communicator,
    buffer: FlatBuffer,
    layout: FactoredLayout,
    shard_state: ShardState,
    index_of: dict[int, int],
    prefix: str,
    to_rank: int,
) -> None:
    """Collective: each factored parameter's whole row and column state on ``to_rank``, each
    entry from the rank that holds its row's (matrix's) first element."""
    pieces = {p.param_index: p for p in layout.pieces}
    for span, p in zip(buffer.layout.params, buffer.params):
        if not is_factored(span.shape):
            continue
        for kind, shape in factored_shapes(span.shape).items():
            whole = shard_state.factored[kind].new_zeros(shape).view(-1)
            piece = pieces.get(span.index)
            if piece is not None:
                held = touched(span.shape, piece.elements)[kind]
                mine = owned(span.shape, piece.elements)[kind]
                local = piece.rows if kind == "r" else piece.columns
                start = local.start + mine.start - held.start
                whole[mine.slice] = shard_state.factored[kind][start : start + mine.numel]
            comm.reduce_sum_to_(whole, to_rank)
            state.setdefault(index_of[id(p)], {})[f"{prefix}/{kind}"] = whole.view(shape)
