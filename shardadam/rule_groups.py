"""A rule's hyperparameters in torch's param groups: under which keys they live, and back.

Note [Keras names and torch keys] (in ``config``): torch's LR schedulers and tooling read
``param_groups`` under torch's keys, so a rule may keep a hyperparameter under another key
(``GROUP_KEYS`` in its module: Adam keeps ``beta_1`` as ``betas[0]``, ``epsilon`` as ``eps``);
by default it lives under its Keras name. Values may be zero-argument callables (Keras allows
them for some arguments), which are called when a step forms its scalars.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GroupKeys = dict[str, tuple[str, int | None]]


def rule_group_keys(rule: Any) -> GroupKeys:
    """Keras name -> (param-group key, index within a tuple-valued key or None)."""
    own = getattr(rule, "GROUP_KEYS", {})
    return {name: own.get(name, (name, None)) for name in rule.HYPERPARAMETERS}


def _tuple_keys(keys: GroupKeys) -> dict[str, list[str]]:
    """Tuple-valued group key -> the Keras names of its elements, in order."""
    tuples: dict[str, list[str]] = {}
    for name, (key, index) in sorted(keys.items(), key=lambda item: item[1][1] or 0):
        if index is not None:
            tuples.setdefault(key, []).append(name)
    return tuples


def group_entries(rule: Any, hp: Mapping[str, Any]) -> dict[str, Any]:
    """The rule's hyperparameters (Keras names) as param-group entries."""
    keys = rule_group_keys(rule)
    entries: dict[str, Any] = {}
    for key, names in _tuple_keys(keys).items():
        entries[key] = tuple(hp[name] for name in names)
    for name, (key, index) in keys.items():
        if index is None:
            entries[key] = hp[name]
    return entries


def hyperparameters_of(rule: Any, group: Mapping[str, Any]) -> dict[str, Any]:
    """The rule's hyperparameters under Keras's names, from a param group (as stored)."""
    hp = {}
    for name, (key, index) in rule_group_keys(rule).items():
        hp[name] = group[key] if index is None else group[key][index]
    return hp


def evaluated(rule: Any, hp: Mapping[str, Any]) -> dict[str, Any]:
    """``hp`` with each zero-argument callable replaced by the float it returns now, checked
    by the rule (a callable may return a value out of range)."""
    values = {name: float(v()) if callable(v) else v for name, v in hp.items()}
    rule.check(values)
    return values


def check_group_shape(rule: Any, group: Mapping[str, Any], where: str) -> None:
    """A tuple-valued key must hold one value per element (``betas``: a pair)."""
    for key, names in _tuple_keys(rule_group_keys(rule)).items():
        value = group[key]
        if not isinstance(value, (tuple, list)) or len(value) != len(names):
            kind = "a pair" if len(names) == 2 else f"{len(names)} values"
            raise TypeError(
                f"Invalid {key}{where}: {value!r} (expected {kind} ({', '.join(names)}))"
            )


def fill_tuple_gaps(rule: Any, group: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """None elements of a tuple-valued key (one element given by its Keras name) take the
    optimizer's default."""
    for key in _tuple_keys(rule_group_keys(rule)):
        if key in group and None in group[key]:
            group[key] = tuple(d if v is None else v for v, d in zip(group[key], defaults[key]))


def without_code(rule: Any, group: dict[str, Any]) -> None:
    """Replace callables among the rule's group entries by None (a state dict holds values)."""
    keys = rule_group_keys(rule)
    for key in _tuple_keys(keys):
        group[key] = tuple(None if callable(v) else v for v in group[key])
    for _, (key, index) in keys.items():
        if index is None and callable(group.get(key)):
            group[key] = None


def merged_saved_value(rule: Any, key: str, current: Any, saved: Any) -> Any:
    """A saved group entry to load, keeping the current callables where it holds None."""
    if key in _tuple_keys(rule_group_keys(rule)):
        return tuple(old if new is None else new for old, new in zip(current, saved))
    if saved is None and callable(current):
        return current
    return saved
