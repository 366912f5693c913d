"""Run one update rule (``shardadam.rules.<name>``) and Keras 3's optimizer on the same gradients.

Engine-free: the rule's ``scalars`` and ``update`` (compiled) or ``update_`` (eager) are called
on one flat tensor, as the engine calls them on a shard, with none of the base optimizer's
features (no clipping, weight decay or EMA: the engine's own tests cover those for every rule).
Keras 3 (torch backend, float32) is the reference: ``keras.optimizers.<NAME>`` applied to a
``keras.Variable`` of the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from shardadam.factored import FactoredLayout, factored_shapes, is_factored
from shardadam.kernels import compile_function
from shardadam.layout import build_layout

RTOL, ATOL = 1e-5, 1e-6
_compiled: dict[tuple[str, tuple], Any] = {}


def varied_grads(shape: Sequence[int], steps: int = 50, seed: int = 0) -> list[torch.Tensor]:
    """Gradients whose scale varies from 1e-2 to 1e1 from step to step, some elements exactly 0
    (sign and sqrt edge cases), and a sign flip now and then."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(steps):
        scale = 10 ** (torch.rand((), generator=gen).item() * 3 - 2)
        g = torch.randn(tuple(shape), generator=gen) * scale
        g = torch.where(torch.rand(tuple(shape), generator=gen) < 0.05, torch.zeros(()), g)
        grads.append(g)
    return grads


def keras_weights(
    rule: ModuleType,
    hp: dict[str, Any],
    learning_rate: float,
    init: torch.Tensor,
    grads: list[torch.Tensor],
    slots_out: dict[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Keras's variable after each step; ``slots_out`` receives its state variables at the end
    (``{name without the variable's prefix: value}``)."""
    import keras

    optimizer = getattr(keras.optimizers, rule.NAME)(learning_rate=learning_rate, **hp)
    variable = keras.Variable(init.clone(), dtype="float32", name="w")
    history = []
    for g in grads:
        optimizer.apply_gradients([(g.clone(), variable)])
        history.append(torch.as_tensor(keras.ops.convert_to_numpy(variable)).clone())
    if slots_out is not None:
        slots_out.update(
            (v.name.removeprefix("w_"), torch.as_tensor(keras.ops.convert_to_numpy(v)).clone())
            for v in optimizer.variables
            if v.name.startswith("w_")
        )
        if hasattr(rule, "FACTORED_SLOTS") and is_factored(tuple(init.shape)):
            for name, variables in zip(rule.FACTORED_SLOTS, (optimizer._r, optimizer._c)):
                slots_out[name] = torch.as_tensor(keras.ops.convert_to_numpy(variables[0]))
    return history


def rule_weights(
    rule: ModuleType,
    hp: dict[str, Any],
    learning_rate: float,
    init: torch.Tensor,
    grads: list[torch.Tensor],
    compiled: bool,
    slots_out: dict[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The rule's weights after each step: ``update`` compiled, or ``update_`` in place;
    ``slots_out`` receives its slots at the end, by name."""
    full = {**rule.HYPERPARAMETERS, **hp}
    rule.check(full)
    dtype = torch.float32
    weights = init.reshape(-1).to(dtype).clone()
    slots = tuple(torch.full_like(weights, float(value)) for value in rule.slots(full).values())
    static = rule.static(full)
    carry = {k: torch.tensor(v, dtype=dtype) for k, v in getattr(rule, "CARRY", {}).items()}
    lr = torch.tensor(learning_rate, dtype=dtype)
    factored, factored_state = None, None
    if hasattr(rule, "FACTORED_SLOTS"):
        factored = FactoredLayout(build_layout([tuple(init.shape)], ["w"], 1, 1), 0, init.device)
        factored_state = (
            torch.zeros(factored.numel["rows"]),
            torch.zeros(factored.numel["columns"]),
        )
    update = rule.update
    if compiled:
        key = (rule.NAME, static)
        if key not in _compiled:
            _compiled[key] = compile_function(rule.update)
        update = _compiled[key]
    history = []
    for step, g in enumerate(grads, start=1):
        if hasattr(rule, "CARRY"):
            scalars, carry = rule.scalars(full, lr, step, dtype, carry)
        else:
            scalars = rule.scalars(full, lr, step, dtype)
        grad = g.reshape(-1).to(dtype).clone()
        extra = ()
        if factored is not None:  # a factored rule: the engine's rows and columns, one rank
            factored_state, pre = _factored_step(rule, factored, factored_state, weights, grad,
                                                 slots, scalars, static)  # fmt: skip
            extra = (pre,)
        if hasattr(rule, "TENSOR_STATS"):  # a per-tensor rule: here, one tensor
            terms = rule.tensor_terms(weights, grad, slots, scalars, static, *extra)
            sums = terms.sum(1, keepdim=True)
            sizes = torch.tensor([float(grad.numel())])
            per_tensor = rule.tensor_factors(sums, sizes, scalars, static)
            extra = (torch.cat([*extra, per_tensor.expand(-1, grad.numel())]),)
        if compiled:
            weights, slots = update(weights, grad, slots, scalars, static, *extra)
            slots = tuple(slots)
        else:
            rule.update_(weights, grad, slots, scalars.tolist(), static, *extra)
        history.append(weights.reshape(init.shape).clone())
    if slots_out is not None:
        slots_out.update(
            (name, t.reshape(init.shape).clone()) for name, t in zip(rule.slots(full), slots)
        )
        if factored is not None and factored.pieces:
            shapes = factored_shapes(tuple(init.shape))
            for name, t in zip(rule.FACTORED_SLOTS, factored_state):
                slots_out[name] = t.reshape(shapes[name]).clone()
    return history


def _factored_step(rule, layout, state, weights, grad, slots, scalars, static):
    """What the engine does for a factored rule before its per-tensor statistics (``ShardUpdater
    ._factored_factors``), in one process: the new rows and columns, and ``[2, numel]``: each
    element's factored estimate and the 0/1 mask of factored elements."""
    terms = rule.row_col_terms(weights, grad, slots, scalars, static)
    row_means, col_means = layout.means(*layout.row_col_sums(terms))
    r, c = rule.factored_state(*state, row_means, col_means, scalars, static)
    r_means = layout.per_row(layout.matrix_sums(r))
    rows, columns = rule.factored_values(r, c, r_means, scalars, static)
    estimate = layout.outer(rows, columns, out=torch.empty(grad.numel()))
    return (r, c), torch.stack([estimate, layout.mask(grad.numel(), estimate.dtype)])


def assert_matches_keras(
    rule: ModuleType,
    hp: dict[str, Any],
    learning_rate: float,
    shape: Sequence[int] = (7, 5),
    steps: int = 50,
    seed: int = 0,
    compiled: bool = False,
) -> None:
    """The rule's weights equal Keras's after every step, within RTOL/ATOL."""
    gen = torch.Generator().manual_seed(seed + 1000)
    init = torch.randn(tuple(shape), generator=gen)
    grads = varied_grads(shape, steps, seed)
    keras_slots: dict[str, torch.Tensor] = {}
    our_slots: dict[str, torch.Tensor] = {}
    expected = keras_weights(rule, hp, learning_rate, init, grads, keras_slots)
    actual = rule_weights(rule, hp, learning_rate, init, grads, compiled, our_slots)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        torch.testing.assert_close(
            a, e, rtol=RTOL, atol=ATOL, msg=lambda m, s=step: f"step {s} ({hp}): {m}"
        )
    # The state too, under Keras's names: what a checkpoint holds and a resumed run reads.
    assert sorted(our_slots) == sorted(keras_slots), (sorted(our_slots), sorted(keras_slots))
    for name, value in our_slots.items():
        torch.testing.assert_close(
            value, keras_slots[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}"
        )
