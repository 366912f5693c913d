"""Settings of ShardedAdam: names, allowed values and their validation.

This module knows no torch: values that may be tensors are recognised by duck typing, so the
rules below hold for the YAML configs of the training app as much as for Python callers.

Note [Keras names and torch keys]
    ShardedAdam takes Keras's argument names, while torch's LR schedulers and tooling read
    torch's keys from ``param_groups``. ``GROUP_KEYS`` is the one table that maps the first onto
    the second; the README reproduces it. Per-group hyperparameters live only under torch's keys
    and are read from ``param_groups`` at every step.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

# Keras argument name -> (param_group key, index within a tuple-valued key or None).
GROUP_KEYS: dict[str, tuple[str, int | None]] = {
    "learning_rate": ("lr", None),
    "beta_1": ("betas", 0),
    "beta_2": ("betas", 1),
    "epsilon": ("eps", None),
    "weight_decay": ("weight_decay", None),
    "amsgrad": ("amsgrad", None),
    "clipnorm": ("clipnorm", None),
    "clipvalue": ("clipvalue", None),
}

BASE_GROUP_KEYS = {
    name: GROUP_KEYS[name] for name in ("learning_rate", "weight_decay", "clipnorm", "clipvalue")
}
"""The keys of the base optimizer's per-group arguments; a rule adds its own."""

# Keys that the optimizer adds to every param group besides GROUP_KEYS' targets.
# ``lr_schedule`` holds a schedule or zero-argument callable when the learning rate is one;
# ``lr`` then holds the value the last step used.
LR_SCHEDULE_KEY = "lr_schedule"

# Arguments that hold for the whole optimizer and may not be overridden per group, with why.
OPTIMIZER_WIDE = {
    "global_clipnorm": "it clips by the norm over all parameters",
    "use_ema": "the EMA is kept for every parameter",
    "ema_momentum": "the EMA is kept for every parameter",
    "ema_overwrite_frequency": "the EMA is kept for every parameter",
    "loss_scale_factor": "gradients are unscaled once for all parameters",
    "gradient_accumulation_steps": "all parameters step together",
    "jit_compile": "it is a property of the optimizer",
    "name": "it is a property of the optimizer",
}

STAGES = (1, 2)
COMM_MODES = ("auto", "native", "ring", "pairwise", "all_reduce")
BACKENDS = ("auto", "gloo", "nccl")  # torch.distributed's, with "auto": NCCL given CUDA


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "dim") and hasattr(value, "dtype")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_learning_rate(value: Any, where: str = "learning_rate") -> None:
    """Accept a non-negative number, a 1-element floating tensor, a schedule or a callable."""
    if _is_tensor(value):
        if value.numel() != 1 or value.dim() > 1 or not value.is_floating_point():
            raise ValueError(
                f"Invalid {where}: a tensor learning rate must be a 1-element floating tensor "
                f"(0-d or 1-d), got shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        return
    if callable(value):
        return
    if not _is_number(value):
        raise TypeError(
            f"Invalid {where}: {value!r} (expected a float, an int, a 1-element floating tensor, a "
            "shardadam.schedules schedule, or a callable that takes no arguments)"
        )
    check_number_range(value, where, low=0.0)


def check_beta(value: Any, where: str) -> None:
    """Accept a float in [0, 1) or a zero-argument callable returning one."""
    if callable(value):
        return
    if _is_tensor(value) and value.dim() == 0:
        value = float(value)
    if not _is_number(value):
        raise TypeError(
            f"Invalid {where}: {value!r} (expected a float in [0, 1) or a callable that takes "
            "no arguments and returns one)"
        )
    check_beta_value(float(value), where)


def check_beta_value(value: float, where: str) -> None:
    if not (0.0 <= value < 1.0):
        raise ValueError(f"Invalid {where}: {value} (expected 0 <= {where} < 1)")


def check_number_range(
    value: Any,
    where: str,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    optional: bool = False,
) -> None:
    """Check that ``value`` is a finite real number in the given range (None when optional)."""
    if value is None and optional:
        return
    if not _is_number(value):
        kind = "a number or None" if optional else "a number"
        raise TypeError(f"Invalid {where}: {value!r} (expected {kind})")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"Invalid {where}: {value} (expected a finite number)")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        rules = []
        if low is not None:
            rules.append(f"{where} > {low}" if low_open else f"{where} >= {low}")
        if high is not None:
            rules.append(f"{where} <= {high}")
        raise ValueError(f"Invalid {where}: {value} (expected {' and '.join(rules)})")


def check_positive_int(value: Any, where: str, minimum: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(
            f"Invalid {where}: {value!r} (expected an integer >= {minimum}"
            + (" or None)" if optional else ")")
        )


def check_bool(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {where}: {value!r} (expected True or False)")


def check_clip_exclusive(clipnorm: Any, clipvalue: Any, global_clipnorm: Any, where: str) -> None:
    """Keras allows at most one of the three clipping arguments."""
    if sum(a is not None for a in (clipnorm, clipvalue, global_clipnorm)) > 1:
        raise ValueError(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
            f"Received: clipnorm={clipnorm}, clipvalue={clipvalue}, "
            f"global_clipnorm={global_clipnorm}{where}"
        )


def group_from_keras_names(
    overrides: dict[str, Any], where: str, keys: dict[str, tuple[str, int | None]] | None = None
) -> dict[str, Any]:
    """Translate a param-group dict given with Keras names into torch's keys (``keys``: the
    table to use, GROUP_KEYS by default).

    Torch keys pass through unchanged; a value given under both names is an error.
    """
    keys = GROUP_KEYS if keys is None else keys
    group = {k: v for k, v in overrides.items() if k not in keys}
    for keras_name, value in overrides.items():
        if keras_name in OPTIMIZER_WIDE:
            raise ValueError(
                f"Invalid {where}: {keras_name!r} cannot be set per param group, because "
                f"{OPTIMIZER_WIDE[keras_name]}; pass it to the optimizer itself"
            )
        if keras_name not in keys:
            continue
        key, index = keys[keras_name]
        if index is None:
            if key != keras_name and key in overrides:
                raise ValueError(
                    f"Invalid {where}: both {keras_name!r} and {key!r} are given; use one"
                )
            group[key] = value
        else:
            if key in overrides:
                raise ValueError(
                    f"Invalid {where}: both {keras_name!r} and {key!r} are given; use one"
                )
            width = 1 + max(i for k, i in keys.values() if k == key and i is not None)
            values = list(group.get(key, (None,) * width))
            values[index] = value
            group[key] = tuple(values)
    return group


def check_group(group: dict[str, Any], where: str, prefix: str = "") -> None:
    """Validate the hyperparameters of one param group (torch keys; see GROUP_KEYS).

    Messages name each value ``<prefix><Keras name><where>``: ``where`` says which group,
    ``prefix`` where the caller wrote it (``"optimizer."`` in the app's config)."""
    schedule = group.get(LR_SCHEDULE_KEY)
    check_learning_rate(
        schedule if schedule is not None else group["lr"], f"{prefix}learning_rate{where}"
    )
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"Invalid betas{where}: {betas!r} (expected a pair (beta_1, beta_2))")
    check_beta(betas[0], f"{prefix}beta_1{where}")
    check_beta(betas[1], f"{prefix}beta_2{where}")
    check_number_range(group["eps"], f"{prefix}epsilon{where}", low=0.0)
    check_bool(group["amsgrad"], f"{prefix}amsgrad{where}")
    check_base_group(group, where, prefix)


def check_base_group(group: dict[str, Any], where: str, prefix: str = "") -> None:
    """Validate what every rule's param group holds besides the learning rate: weight decay
    and the per-tensor clipping arguments."""
    check_number_range(group["weight_decay"], f"{prefix}weight_decay{where}", low=0.0)
    for name in ("clipnorm", "clipvalue"):
        check_number_range(
            group[name], f"{prefix}{name}{where}", low=0.0, low_open=True, optional=True
        )
    if group["clipnorm"] is not None and group["clipvalue"] is not None:
        check_clip_exclusive(group["clipnorm"], group["clipvalue"], None, where)


@dataclass(frozen=True)
class OptimizerOptions:
    """Arguments of ShardedAdam that hold for all its parameters."""

    global_clipnorm: float | None = None
    """Clip all gradients together so that their joint L2 norm is at most this."""
    use_ema: bool = False
    """Keep an exponential moving average of every parameter."""
    ema_momentum: float = 0.99
    """Weight of the old average in each EMA update."""
    ema_overwrite_frequency: int | None = None
    """Write the averages into the parameters after every this many steps."""
    loss_scale_factor: float | None = None
    """Divide gradients by this before anything else (the loss was multiplied by it)."""
    gradient_accumulation_steps: int | None = None
    """Apply the mean gradient of this many calls to step() once."""
    jit_compile: bool = True
    """Run the per-shard update as one torch.compile'd kernel."""
    name: str = "Adam"
    """Prefix of the optimizer's state names in state_dict()."""

    def __post_init__(self) -> None:
        check_optimizer_options(self)


def check_optimizer_options(options: Any, prefix: str = "") -> None:
    """The checks of OptimizerOptions on any object with its fields (the app's config too);
    messages name each value ``<prefix><name>``."""
    check_number_range(
        options.global_clipnorm, f"{prefix}global_clipnorm", low=0.0, low_open=True, optional=True
    )
    check_bool(options.use_ema, f"{prefix}use_ema")
    check_number_range(options.ema_momentum, f"{prefix}ema_momentum", low=0.0, high=1.0)
    check_positive_int(
        options.ema_overwrite_frequency, f"{prefix}ema_overwrite_frequency", minimum=1
    )
    check_number_range(
        options.loss_scale_factor,
        f"{prefix}loss_scale_factor",
        low=0.0,
        low_open=True,
        optional=True,
    )
    check_positive_int(
        options.gradient_accumulation_steps, f"{prefix}gradient_accumulation_steps", minimum=2
    )
    check_bool(options.jit_compile, f"{prefix}jit_compile")
    if not isinstance(options.name, str) or not options.name or "/" in options.name:
        raise ValueError(
            f"Invalid {prefix}name: {options.name!r} (expected a non-empty string without '/')"
        )


@dataclass(frozen=True)
class ShardingOptions:
    """How ShardedAdam splits its state across the ranks of a process group."""

    stage: int = 2
    """ZeRO stage: 1 shards optimizer state; 2 also shards reduced gradients."""
    bucket_cap_mb: float = 25.0
    """Size of the gradient buckets reduced while backward runs, in MiB."""
    comm: str = "auto"
    """Collectives: auto (per backend), native, ring or pairwise (point-to-point), all_reduce."""
    align_numel: int = 16
    """Each parameter starts at a multiple of this many elements in its flat buffer."""
    overlap_param_gather: bool = False
    """Let step() return before the parameters are gathered; every read waits for its bucket."""

    def __post_init__(self) -> None:
        check_sharding_options(self)
        check_positive_int(self.align_numel, "align_numel", minimum=1, optional=False)


def check_sharding_options(options: Any, prefix: str = "") -> None:
    """The checks of ShardingOptions on any object with its fields; messages name each value
    ``<prefix><name>``."""
    stage = options.stage
    if stage not in STAGES or isinstance(stage, bool):
        raise ValueError(f"Invalid {prefix}stage: {stage!r} (expected one of {STAGES})")
    check_number_range(options.bucket_cap_mb, f"{prefix}bucket_cap_mb", low=0.0, low_open=True)
    if options.comm not in COMM_MODES:
        raise ValueError(f"Invalid {prefix}comm: {options.comm!r} (expected one of {COMM_MODES})")
    check_bool(options.overlap_param_gather, f"{prefix}overlap_param_gather")
