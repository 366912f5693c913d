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

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
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


def group_from_keras_names(overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Translate a param-group dict given with Keras names into torch's keys.

    Torch keys pass through unchanged; a value given under both names is an error.
    """
    group = {k: v for k, v in overrides.items() if k not in GROUP_KEYS}
    for keras_name, value in overrides.items():
        if keras_name in OPTIMIZER_WIDE:
            raise ValueError(
                f"Invalid {where}: {keras_name!r} cannot be set per param group, because "
                f"{OPTIMIZER_WIDE[keras_name]}; pass it to ShardedAdam itself"
            )
        if keras_name not in GROUP_KEYS:
            continue
        key, index = GROUP_KEYS[keras_name]
        if index is None:
            if key != keras_name and key in overrides:
                raise ValueError(
                    f"Invalid {where}: both {keras_name!r} and {key!r} are given; use one"
                )
            group[key] = value
        else:
            if "betas" in overrides:
                raise ValueError(
                    f"Invalid {where}: both {keras_name!r} and 'betas' are given; use one"
                )
            betas = list(group.get("betas", (None, None)))
            betas[index] = value
            group["betas"] = tuple(betas)
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
    check_number_range(group["weight_decay"], f"{prefix}weight_decay{where}", low=0.0)
    check_bool(group["amsgrad"], f"{prefix}amsgrad{where}")
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


# ---------------------------------------------------------------------- the training app
# The schema of the training app's configs (``shardadam/configs/``, composed in ``train.py``).
# Hydra checks keys and types against these dataclasses when it composes a config; converting
# to them runs the checks below, before anything starts.

BACKENDS = ("auto", "gloo", "nccl")
RESUME_AUTO = "auto"


@dataclass
class OptimizerConfig:
    """ShardedAdam's arguments under Keras's names (see the README's table), with the same
    defaults: the schema mirrors the constructor (tests/unit/test_app_config.py keeps them
    equal), since Hydra needs fields it can check where the constructor has parameters."""

    learning_rate: float = 1e-3
    """The learning rate, or the peak that a schedule's config refers to."""
    schedule: Any = None
    """A learning-rate schedule to instantiate (``_target_`` and its arguments), or null."""
    beta_1: float = 0.9
    """Decay of the first-moment (mean) estimate."""
    beta_2: float = 0.999
    """Decay of the second-moment estimate."""
    epsilon: float = 1e-7
    """Keras's epsilon hat, added to sqrt(v)."""
    amsgrad: bool = False
    """Use the running maximum of the second moment."""
    weight_decay: float | None = None
    """Decoupled weight decay, applied before the update."""
    exclude_from_weight_decay: list[str] = field(default_factory=list)
    """Regular expressions searched in parameter names: matching parameters are not decayed."""
    clipnorm: float | None = None
    """Clip each gradient tensor to this L2 norm."""
    clipvalue: float | None = None
    """Clip each gradient element to [-clipvalue, clipvalue]."""
    global_clipnorm: float | None = None
    """Clip all gradients together to this joint L2 norm."""
    use_ema: bool = False
    """Keep an exponential moving average of the weights (evaluated beside the weights)."""
    ema_momentum: float = 0.99
    """Weight of the old average in each EMA update."""
    ema_overwrite_frequency: int | None = None
    """Write the averages into the weights every this many steps."""
    loss_scale_factor: float | None = None
    """The loss is multiplied by this before backward; gradients are divided by it."""
    gradient_accumulation_steps: int | None = None
    """Apply the mean gradient of this many micro-batches (trainer steps) at once."""
    jit_compile: bool = True
    """Compile the per-shard update with torch.compile."""
    name: str = "Adam"
    """Prefix of the optimizer's state names."""

    def __post_init__(self) -> None:
        # The constructor's own checks, at start-up, naming the keys as the user wrote them.
        group = {
            "lr": self.learning_rate,
            "betas": (self.beta_1, self.beta_2),
            "eps": self.epsilon,
            "weight_decay": 0.0 if self.weight_decay is None else self.weight_decay,
            "amsgrad": self.amsgrad,
            "clipnorm": self.clipnorm,
            "clipvalue": self.clipvalue,
        }
        check_group(group, "", prefix="optimizer.")
        check_optimizer_options(self, prefix="optimizer.")
        check_clip_exclusive(self.clipnorm, self.clipvalue, self.global_clipnorm, "")
        for pattern in self.exclude_from_weight_decay:
            if not isinstance(pattern, str):
                raise TypeError(
                    f"Invalid optimizer.exclude_from_weight_decay: {pattern!r} (expected "
                    "regular expressions as strings)"
                )

    def keras_arguments(self) -> dict[str, Any]:
        """The arguments ShardedAdam takes as they are (the schedule is instantiated apart)."""
        skipped = ("schedule", "exclude_from_weight_decay")
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skipped}


@dataclass
class TrainerConfig:
    """The training loop: length, batches, evaluation, checkpoints and logging."""

    steps: int = 400
    """Calls of optimizer.step() (micro-batches when accumulating gradients)."""
    batch_size: int = 32
    """Global batch: samples per step over all ranks (must divide evenly among them)."""
    seed: int = 0
    """Seeds the model's initialisation and the order of the training samples."""
    eval_every: int = 50
    """Evaluate on the held-out split every this many steps (and at the end); 0: only at the end."""
    eval_samples: int = 512
    """Held-out samples per evaluation (the first ones; fewer if the split is smaller)."""
    log_every: int = 10
    """Refresh the progress bar and TensorBoard's training scalars every this many steps
    (evaluations and metrics.jsonl: always)."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many steps (and at the end); 0: only at the end."""
    checkpoint_dir: str = "checkpoints"
    """Where checkpoints go; relative paths are inside the run's output directory."""
    keep_last: int | None = 2
    """How many checkpoints to keep (null: all)."""
    resume: str | None = None
    """null: start afresh; ``auto``: continue from the latest checkpoint in checkpoint_dir if
    there is one (a requeued job); a path: continue from that checkpoint, or the latest in that
    directory (an error if it holds none). Checkpoints are written into checkpoint_dir either
    way; the config's hyperparameters win over the checkpoint's (README, "Resuming")."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    tensorboard: bool = False
    """Also write the metrics for TensorBoard (needs the tensorboard package)."""
    plot: bool = True
    """Write loss.png (training and held-out loss) at the end."""
    threads: int | None = None
    """torch.set_num_threads per rank (null: torch's default in one process, else cores/ranks)."""
    loss: Any = None
    """A loss to instantiate (``_target_``, e.g. torch.nn.SmoothL1Loss), called as
    loss(output, target) -> scalar; null: the model's own where the samples hold ``labels``
    and it returns a ``loss``, else the data's (cross_entropy or mse)."""
    ignore_index: int = -100
    """cross_entropy targets equal to this count for nothing, in the loss and its mean."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process)."""

    def __post_init__(self) -> None:
        check_positive_int(self.steps, "trainer.steps", minimum=1, optional=False)
        check_positive_int(self.batch_size, "trainer.batch_size", minimum=1, optional=False)
        for name in ("eval_every", "checkpoint_every"):
            check_positive_int(getattr(self, name), f"trainer.{name}", minimum=0, optional=False)
        check_positive_int(self.eval_samples, "trainer.eval_samples", minimum=1, optional=False)
        check_positive_int(self.log_every, "trainer.log_every", minimum=1, optional=False)
        check_positive_int(self.keep_last, "trainer.keep_last", minimum=1)
        check_positive_int(self.threads, "trainer.threads", minimum=1)
        check_positive_int(self.num_workers, "trainer.num_workers", minimum=0, optional=False)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(
                f"Invalid trainer.ignore_index: {self.ignore_index!r} (expected an integer)"
            )
        has_target = isinstance(self.loss, dict) and bool(self.loss.get("_target_"))
        if self.loss is not None and not has_target:
            raise ValueError(
                f"Invalid trainer.loss: {self.loss!r} (expected null for the data's loss, or "
                "a config with a _target_, e.g. trainer.loss={_target_:torch.nn.SmoothL1Loss})"
            )
        if isinstance(self.resume, bool) or str(self.resume).lower() in ("true", "false", ""):
            raise ValueError(
                f"Invalid trainer.resume: {self.resume!r} (expected null to start afresh, "
                f"{RESUME_AUTO} to continue from checkpoint_dir's latest checkpoint if any, or "
                "the path of a checkpoint or of a directory of them)"
            )


@dataclass
class DistributedConfig:
    """How the ranks start and how ShardedAdam shards across them."""

    backend: str = "auto"
    """auto (NCCL with CUDA, else gloo), gloo or nccl."""
    world_size: int | None = None
    """Expected number of ranks: a launch with another number fails at start (null: any)."""
    timeout_s: float = 600.0
    """How long a collective may wait for the other ranks."""
    stage: int = 2
    """ZeRO stage: 1 shards optimizer state; 2 also shards reduced gradients."""
    bucket_cap_mb: float = 25.0
    """Size of the gradient buckets reduced while backward runs, in MiB."""
    comm: str = "auto"
    """Collectives: auto, native, ring, pairwise or all_reduce (see the README)."""
    overlap_param_gather: bool = False
    """Let the next forward overlap the parameter all-gather."""
    broadcast_buffers: bool = False
    """Also broadcast rank 0's buffers before every training forward, as DDP does (they are
    always broadcast before each evaluation and each save)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"Invalid distributed.backend: {self.backend!r} (expected one of {BACKENDS})"
            )
        check_positive_int(self.world_size, "distributed.world_size", minimum=1)
        check_number_range(self.timeout_s, "distributed.timeout_s", low=0.0, low_open=True)
        check_bool(self.broadcast_buffers, "distributed.broadcast_buffers")
        check_sharding_options(self, prefix="distributed.")  # the optimizer's, at start-up

    def sharding_options(self) -> dict[str, Any]:
        """The keyword arguments ShardedAdam takes for sharding."""
        names = ("stage", "bucket_cap_mb", "comm", "overlap_param_gather")
        return {name: getattr(self, name) for name in names}


@dataclass
class TrainConfig:
    """The whole app: ``model`` and ``data`` are instantiated from their ``_target_``."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    model: Any = None
    """An nn.Module to build: ``_target_`` (its import path) and its arguments."""
    data: Any = None
    """A factory returning ``shardadam.datasets.Splits``: ``_target_`` and its arguments."""

    def __post_init__(self) -> None:
        for name in ("model", "data"):
            spec = getattr(self, name)
            if not isinstance(spec, dict) or not spec.get("_target_"):
                example = {
                    "model": "model._target_=shardadam.models.MLPClassifier",
                    "data": "data._target_=shardadam.datasets.teacher_classification",
                }[name]
                raise ValueError(
                    f"{name}._target_ is missing: set it to the import path of the {name} to "
                    f"build (for example {example}, or pick a config: {name}=<name>)"
                )


def check_known_keys(values: dict[str, Any], schema: type = TrainConfig, where: str = "") -> None:
    """Refuse a key of ``values`` (a composed config, as plain dicts) that ``schema`` has no
    field for, naming the keys it has: Hydra adds any key given with ``+``, and converting to
    the dataclasses would drop it silently, so a misspelt setting would train on the default.
    Fields that are dataclasses are checked inside; others (``model``, ``data``, a schedule)
    hold whatever their ``_target_`` takes."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {where}{close[0]}?)" if close else ""
            raise ValueError(
                f"Unknown key {where}{key}{hint}: {where.rstrip('.') or 'the config'} has "
                f"{', '.join(fields)}"
            )
        factory = fields[key].default_factory
        if factory is not dataclasses.MISSING and isinstance(value, dict):
            check_known_keys(value, type(factory()), f"{where}{key}.")
