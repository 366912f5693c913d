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
LR = 0.05


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
    keras_name: str = "Adam",
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Keras 3's optimizer ``keras_name`` over keras.Variables; returns (parameters, EMA
    averages or None)."""
    import keras

    variables = [
        keras.Variable(x.numpy(), dtype="float32", name=n) for x, n in zip(case.init, case.names)
    ]
    opt = getattr(keras.optimizers, keras_name)(**kwargs)
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
    optimizer_class: type = ShardedAdam,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, ShardedAdam]:
    params = params if params is not None else make_params(case)
    opt = optimizer_class(list(zip(case.names, params)), **kwargs)
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


def make_schedule(module, kind: str):
    """The same schedule from Keras's module or ours (same class names and arguments)."""
    if kind == "exponential":
        return module.ExponentialDecay(LR, decay_steps=7, decay_rate=0.8)
    if kind == "exponential_staircase":
        return module.ExponentialDecay(LR, decay_steps=7, decay_rate=0.8, staircase=True)
    if kind == "piecewise":
        return module.PiecewiseConstantDecay([5, 20, 30], [LR, 0.02, 0.01, 0.001])
    if kind == "polynomial":
        return module.PolynomialDecay(LR, decay_steps=30, end_learning_rate=1e-3, power=2.0)
    if kind == "polynomial_cycle":
        return module.PolynomialDecay(LR, decay_steps=15, power=0.5, cycle=True)
    if kind == "inverse_time":
        return module.InverseTimeDecay(LR, decay_steps=5, decay_rate=0.5, staircase=True)
    if kind == "cosine":
        return module.CosineDecay(LR, decay_steps=40, alpha=0.1)
    if kind == "cosine_warmup":
        return module.CosineDecay(0.0, decay_steps=30, warmup_target=LR, warmup_steps=10)
    if kind == "cosine_restarts":
        return module.CosineDecayRestarts(LR, first_decay_steps=6, t_mul=1.5, m_mul=0.8)
    if kind == "cosine_restarts_t1":
        return module.CosineDecayRestarts(LR, first_decay_steps=6, t_mul=1.0, alpha=0.2)
    raise ValueError(kind)


SCHEDULES = [
    "exponential",
    "exponential_staircase",
    "piecewise",
    "polynomial",
    "polynomial_cycle",
    "inverse_time",
    "cosine",
    "cosine_warmup",
    "cosine_restarts",
    "cosine_restarts_t1",
]


def resolve_schedules(kwargs: dict, module) -> dict:
    """Replace a schedule's name in ``learning_rate`` by the schedule from ``module``."""
    out = dict(kwargs)
    if isinstance(out.get("learning_rate"), str):
        out["learning_rate"] = make_schedule(module, out["learning_rate"])
    return out
