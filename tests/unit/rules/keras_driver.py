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

from shardadam.kernels import compile_function

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
        if hasattr(rule, "TENSOR_STATS"):  # a per-tensor rule: here, one tensor
            sums = rule.tensor_terms(weights, grad, slots, scalars, static).sum(1, keepdim=True)
            extra = (rule.tensor_factors(sums, scalars, static).expand(-1, grad.numel()),)
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
    return history


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
