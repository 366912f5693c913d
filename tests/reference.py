"""Drivers that run the same gradient sequence through Keras 3's Adam and through ShardedAdam.

Keras 3 (torch backend, float32) is the independent reference: tests compare ShardedAdam's
parameters with Keras's after every case, parameter by parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shardadam import ShardedAdam

RTOL, ATOL = 1e-5, 1e-6


@dataclass
class Case:
    """Initial parameters, their names, and a gradient per parameter per step (None: no grad)."""

    names: list[str]
    init: list[torch.Tensor]
    grads: list[list[torch.Tensor | None]]
    transposed: set[int] = field(default_factory=set)
    """Parameters created as transposed (non-contiguous) tensors on the torch side."""


def make_case(
    shapes: list[tuple[int, ...]],
    steps: int = 50,
    seed: int = 0,
    missing: dict[int, set[int]] | None = None,
    transposed: set[int] | None = None,
    names: list[str] | None = None,
) -> Case:
    """Gradients of varied scale (10^-2 .. 10^1) so that clipping thresholds are crossed.

    ``missing`` maps a step to the parameter indices that get no gradient at that step.
    """
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = []
    for step in range(steps):
        scale = 10 ** (torch.rand((), generator=gen).item() * 3 - 2)
        row = [torch.randn(s, generator=gen) * scale for s in shapes]
        for i in (missing or {}).get(step, set()):
            row[i] = None
        grads.append(row)
    names = names or [
        f"layer{i}_{'bias' if len(s) <= 1 else 'kernel'}" for i, s in enumerate(shapes)
    ]
    return Case(names, init, grads, set(transposed or ()))


SHAPES = [(3, 5), (), (1,), (7,), (5, 3), (33, 17), (2, 3, 4)]
"""0-d, size 1, odd sizes, a matrix given transposed (index 4), and a larger tensor."""


def run_keras(
    case: Case,
    kwargs: dict,
    before_step: Callable[[int, object], None] | None = None,
    exclude: dict | None = None,
    finalize: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Keras 3 Adam over keras.Variables; returns (parameters, EMA averages or None)."""
    import keras

    variables = [
        keras.Variable(x.numpy(), dtype="float32", name=n) for x, n in zip(case.init, case.names)
    ]
    opt = keras.optimizers.Adam(**kwargs)
    if exclude:
        var_list = [variables[i] for i in exclude.get("var_list", [])]
        opt.exclude_from_weight_decay(var_list=var_list, var_names=exclude.get("var_names"))
    opt.build(variables)
    for step, grads in enumerate(case.grads):
        if before_step:
            before_step(step, opt)
        opt.apply([None if g is None else g.clone() for g in grads], variables)
    if finalize:
        opt.finalize_variable_values(variables)
    averages = None
    if kwargs.get("use_ema"):
        averages = [torch.as_tensor(a.numpy()) for a in opt._model_variables_moving_average]
    return [torch.as_tensor(v.numpy()) for v in variables], averages


def make_params(case: Case) -> list[torch.nn.Parameter]:
    params = []
    for i, x in enumerate(case.init):
        if i in case.transposed:
            params.append(torch.nn.Parameter(x.t().contiguous().t()))
            assert not params[-1].is_contiguous()
        else:
            params.append(torch.nn.Parameter(x.clone()))
    return params


def run_ours(
    case: Case,
    kwargs: dict,
    before_step: Callable[[int, ShardedAdam], None] | None = None,
    exclude: dict | None = None,
    finalize: bool = False,
    params: list[torch.nn.Parameter] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, ShardedAdam]:
    params = params if params is not None else make_params(case)
    opt = ShardedAdam(list(zip(case.names, params)), **kwargs)
    if exclude:
        var_list = [params[i] for i in exclude.get("var_list", [])]
        opt.exclude_from_weight_decay(var_list=var_list, var_names=exclude.get("var_names"))
    for step, grads in enumerate(case.grads):
        if before_step:
            before_step(step, opt)
        for i, (p, g) in enumerate(zip(params, grads)):
            # A transposed gradient for a transposed parameter, as autograd would give it.
            p.grad = (
                None
                if g is None
                else (g.t().contiguous().t() if i in case.transposed else g.clone())
            )
        opt.step()
        opt.zero_grad()
    if finalize:
        opt.finalize_variable_values()
    averages = None
    if kwargs.get("use_ema"):
        averages = [opt.moving_average(p) for p in params]
    return [p.detach().clone() for p in params], averages, opt


def assert_all_close(
    ours: list[torch.Tensor], theirs: list[torch.Tensor], names: list[str]
) -> None:
    for o, t, n in zip(ours, theirs, names):
        torch.testing.assert_close(o, t, rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
