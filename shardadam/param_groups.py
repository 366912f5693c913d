"""Param groups as the engine reads them: a new group's overrides under torch's keys, checked;
each group's learning rate (a float, a tensor, or a schedule or callable) and hyperparameters
at a step; the parameters' names and indices in optimizer order (over all groups)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .config import (
    BASE_GROUP_KEYS,
    LR_SCHEDULE_KEY,
    check_base_group,
    check_learning_rate,
    group_from_keras_names,
)
from .rule_groups import (
    check_group_shape,
    evaluated,
    fill_tuple_gaps,
    group_entries,
    hyperparameters_of,
    rule_group_keys,
)


def is_step_schedule(schedule: Callable) -> bool:
    """Keras-style schedules take the step counter; other callables take no argument."""
    return any(cls.__name__ == "LearningRateSchedule" for cls in type(schedule).__mro__)


def split_learning_rate(learning_rate: Any) -> tuple[Any, Callable | None]:
    """(value for group["lr"], schedule or callable or None)."""
    if isinstance(learning_rate, Tensor) or not callable(learning_rate):
        return learning_rate, None
    value = learning_rate(0) if is_step_schedule(learning_rate) else learning_rate()
    return float(value), learning_rate


def refuse_set(params: Any, where: str) -> None:
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            f"optimizer parameters{where} are given as a set, whose order can differ between "
            "runs and across ranks (parameters are matched by position); pass a list, e.g. "
            "list(model.parameters()) or model.named_parameters()"
        )


def check_group(rule: ModuleType, group: dict[str, Any], where: str) -> None:
    """Validate one param group's hyperparameters (as stored: torch keys)."""
    schedule = group.get(LR_SCHEDULE_KEY)
    check_learning_rate(schedule if schedule is not None else group["lr"], f"learning_rate{where}")
    check_group_shape(rule, group, where)
    rule.check(hyperparameters_of(rule, group), where)
    check_base_group(group, where)


def default_group(
    rule: ModuleType,
    hyperparameters: dict[str, Any],
    learning_rate: Any,
    weight_decay: float | None,
    clipnorm: float | None,
    clipvalue: float | None,
) -> dict[str, Any]:
    """The optimizer's defaults under torch's keys (what a group takes where it sets
    nothing), checked: the rule's hyperparameters (Keras's names) and the base ones."""
    check_learning_rate(learning_rate)
    lr_value, lr_schedule = split_learning_rate(learning_rate)
    defaults = {
        "lr": lr_value,
        LR_SCHEDULE_KEY: lr_schedule,
        **group_entries(rule, hyperparameters),
        "weight_decay": 0.0 if weight_decay is None else weight_decay,
        "clipnorm": clipnorm,
        "clipvalue": clipvalue,
    }
    check_group(rule, defaults, "")
    return defaults


def new_group(
    rule: ModuleType,
    param_group: dict[str, Any],
    param_groups: list[dict[str, Any]],
    defaults: dict[str, Any],
    owner: str,
) -> dict[str, Any]:
    """A group to add (Keras or torch names for its overrides) under torch's keys, its
    parameters checked against those of ``param_groups``; torch fills in the defaults."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
    where = f" (param group {len(param_groups)})"
    keys = {**BASE_GROUP_KEYS, **rule_group_keys(rule)}
    group = group_from_keras_names(param_group, f"param group {len(param_groups)}", keys)
    fill_tuple_gaps(rule, group, defaults)
    if "lr" in group:
        check_learning_rate(group["lr"], f"learning_rate{where}")
        group["lr"], group[LR_SCHEDULE_KEY] = split_learning_rate(group["lr"])
    if group.get("weight_decay", 0.0) is None:
        group["weight_decay"] = 0.0
    params = group.get("params")
    if isinstance(params, Tensor):
        params = [params]
    refuse_set(params, where)
    params = list(params) if params is not None else []
    check_params(param_groups, params, where, owner)
    group["params"] = params
    if not params and param_groups and "param_names" in param_groups[0]:
        group["param_names"] = []  # an empty group has no names to disagree with
    return group


def check_params(
    param_groups: list[dict[str, Any]], params: list[Any], where: str, owner: str
) -> None:
    """New parameters must be dense floating tensors, each given once, on one device with
    those of ``param_groups`` (``owner``: the optimizer's class name, for the messages)."""
    seen = {
        id(p): f"{n!r} (param group {gi})" if "param_names" in g else f"#{i} (param group {gi})"
        for gi, g in enumerate(param_groups)
        for i, (n, p) in enumerate(zip(g.get("param_names", g["params"]), g["params"]))
    }
    devices = {p.device for g in param_groups for p in g["params"]}
    for i, item in enumerate(params):
        name, p = (repr(item[0]), item[1]) if isinstance(item, tuple) else (f"#{i}", item)
        if not isinstance(p, Tensor):
            raise TypeError(
                f"parameter {name}{where} is a {type(p).__name__}; expected a tensor, a "
                "(name, tensor) pair or a param-group dict"
            )
        if p.is_sparse or p.layout != torch.strided:
            raise ValueError(f"parameter {name}{where} is sparse; {owner} needs dense parameters")
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
            f"parameters are on several devices {sorted(map(str, devices))}; {owner} "
            "needs all parameters on one device (the rank's device)"
        )


def group_param_names(param_groups: list[dict[str, Any]], index: int) -> list[str]:
    """The names of group ``index``'s parameters: as given, else ``"group<g>.param<i>"``."""
    group = param_groups[index]
    return group.get("param_names") or [
        f"group{index}.param{i}" for i in range(len(group["params"]))
    ]


def param_names_of(param_groups: list[dict[str, Any]]) -> list[str]:
    """Each parameter's name in optimizer order (see ``group_param_names``)."""
    return [n for g in range(len(param_groups)) for n in group_param_names(param_groups, g)]


def given_param_names(param_groups: list[dict[str, Any]]) -> list[str]:
    """The names given with the parameters (``named_parameters()``), in optimizer order."""
    return [n for g in param_groups for n in g.get("param_names", ())]


def has_names(param_groups: list[dict[str, Any]]) -> bool:
    """Whether every parameter was given with its name."""
    return all("param_names" in g for g in param_groups)


def param_indices(param_groups: list[dict[str, Any]]) -> dict[int, int]:
    """id(parameter) -> its index in optimizer order (over all groups), as in state_dict."""
    return {id(p): i for i, p in enumerate(p for g in param_groups for p in g["params"])}


def step_hyperparameters(
    rule: ModuleType,
    param_groups: list[dict[str, Any]],
    learning_rate_of: Callable[[int], float | Tensor],
) -> list[tuple[float | Tensor, dict[str, Any]]]:
    """Per group, (learning rate, the rule's hyperparameters by Keras name with callables
    evaluated) for a step, each checked; ``learning_rate_of(index)``: group index's rate."""
    per_group = []
    for index, group in enumerate(param_groups):
        check_group(rule, group, f" (param group {index})")
        lr = learning_rate_of(index)
        if hasattr(rule, "check_learning_rate"):  # a rule that divides by it
            rule.check_learning_rate(float(lr), f" (param group {index})")
        per_group.append((lr, evaluated(rule, hyperparameters_of(rule, group))))
    return per_group


def assign_learning_rate(param_groups: list[dict[str, Any]], learning_rate: Any) -> None:
    """Every group's learning rate becomes ``learning_rate`` (a number, a tensor, or a
    schedule or callable); one driven by a schedule takes only another schedule."""
    check_learning_rate(learning_rate)
    value, schedule = split_learning_rate(learning_rate)
    for group in param_groups:
        if group[LR_SCHEDULE_KEY] is not None and schedule is None:
            raise TypeError(
                "This optimizer was created with a schedule or callable as its "
                "learning_rate, hence its learning rate is not settable to a number; "
                "assign another schedule or create the optimizer with a float learning_rate"
            )
    for group in param_groups:
        group["lr"], group[LR_SCHEDULE_KEY] = value, schedule
