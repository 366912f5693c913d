"""The training app's schema: the dataclasses Hydra composes ``shardadam/configs/`` over (in
``train.py``), with every default the app uses (the YAML files set only what a recipe changes).

The optimizer's schema is the one of the member of the family its ``class_name`` names:
``optimizer_config(class_name)``, made from that member's constructor, so that a member added
to ``shardadam.FAMILY`` has one without code here; ``configs/optimizer/<name>.yaml``, whose
defaults list brings it in, makes the member ``optimizer=<name>``.

Hydra checks keys and types against these dataclasses when it composes a config, except for keys
added with ``+``, which :func:`check_known_keys` refuses; converting to them runs the checks
below (the optimizer's own, naming each value as the user wrote it), before anything starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

from .config import (
    BACKENDS,
    OptimizerOptions,
    ShardingOptions,
    check_base_group,
    check_bool,
    check_clip_exclusive,
    check_learning_rate,
    check_number_range,
    check_optimizer_options,
    check_positive_int,
    check_sharding_options,
)
from .optimizers import FAMILY

RESUME_AUTO = "auto"
DEFAULT_MEMBER = "Adam"
"""The member an optimizer config that names none is for (``TrainConfig()``'s, as before there
were others); the app's default config picks ``optimizer: adam`` explicitly."""


@dataclass
class MemberConfig:
    """The optimizer's keys that every member of the family has (Keras's names, see the README's
    table), with Keras's base-optimizer defaults. A member's schema is the subclass
    ``optimizer_config(class_name)``: these keys with that member's defaults, then its own
    arguments (its rule's); every default is its constructor's (tests/unit/test_app_config.py
    keeps them equal), since Hydra needs fields it can check where the constructor has
    parameters."""

    MEMBER: ClassVar[str | None] = None
    OWN_ARGUMENTS: ClassVar[tuple[str, ...]] = ()

    learning_rate: float = 1e-3
    """The learning rate, or the peak that a schedule's config refers to."""
    schedule: Any = None
    """A learning-rate schedule to instantiate (``_target_`` and its arguments), or null."""
    weight_decay: float | None = None
    """Decoupled weight decay, applied before the update."""
    exclude_from_weight_decay: list[str] = field(default_factory=list)
    """Regular expressions searched in parameter names: matching parameters are not decayed."""
    clipnorm: float | None = None
    """Clip each gradient tensor to this L2 norm."""
    clipvalue: float | None = None
    """Clip each gradient element to [-clipvalue, clipvalue]."""
    global_clipnorm: float | None = OptimizerOptions.global_clipnorm
    """Clip all gradients together to this joint L2 norm."""
    use_ema: bool = OptimizerOptions.use_ema
    """Keep an exponential moving average of the weights (evaluated beside the weights)."""
    ema_momentum: float = OptimizerOptions.ema_momentum
    """Weight of the old average in each EMA update."""
    ema_overwrite_frequency: int | None = OptimizerOptions.ema_overwrite_frequency
    """Write the averages into the weights every this many steps."""
    loss_scale_factor: float | None = OptimizerOptions.loss_scale_factor
    """The loss is multiplied by this before backward; gradients are divided by it."""
    gradient_accumulation_steps: int | None = OptimizerOptions.gradient_accumulation_steps
    """Apply the mean gradient of this many micro-batches (trainer steps) at once."""
    jit_compile: bool = OptimizerOptions.jit_compile
    """Compile the per-shard update with torch.compile."""
    name: str = OptimizerOptions.name
    """Prefix of the optimizer's state names (the member's Keras name by default)."""
    class_name: str = DEFAULT_MEMBER
    """Which member of the family: a key of ``shardadam.FAMILY`` (Adam, SGD, RMSprop, ...).
    ``optimizer=<name in lower case>`` sets it with that member's schema."""

    def __post_init__(self) -> None:
        if self.MEMBER is None:
            raise TypeError(
                "MemberConfig holds the keys every member has; build a member's config with "
                "optimizer_config(class_name)(...)"
            )
        self.check_class_name(self.class_name)
        # The constructor's own checks, at start-up, naming the keys as the user wrote them.
        check_learning_rate(self.learning_rate, "optimizer.learning_rate")
        group = {
            "weight_decay": 0.0 if self.weight_decay is None else self.weight_decay,
            "clipnorm": self.clipnorm,
            "clipvalue": self.clipvalue,
        }
        check_base_group(group, "", prefix="optimizer.")
        check_optimizer_options(self, prefix="optimizer.")
        check_clip_exclusive(self.clipnorm, self.clipvalue, self.global_clipnorm, "")
        for pattern in self.exclude_from_weight_decay:
            if not isinstance(pattern, str):
                raise TypeError(
                    f"Invalid optimizer.exclude_from_weight_decay: {pattern!r} (expected "
                    "regular expressions as strings)"
                )
        self._check_own_arguments()

    @classmethod
    def check_class_name(cls, class_name: Any) -> None:
        """A member's config is for that member: another one is picked by its own config."""
        if class_name != cls.MEMBER:
            option = class_name.lower() if class_name in FAMILY else "<name>"
            raise ValueError(
                f"Invalid optimizer.class_name: {class_name!r} in the config of {cls.MEMBER} "
                f"(expected {cls.MEMBER!r}; pick another member with optimizer={option}, one "
                f"of {', '.join(n.lower() for n in FAMILY)})"
            )

    def _check_own_arguments(self) -> None:
        """The member's rule's checks (and, without a schedule, its learning-rate check)."""
        rule = member_rule(self.MEMBER)
        if rule is None:
            return  # its constructor checks them when the app builds it
        try:
            rule.check({name: getattr(self, name) for name in self.OWN_ARGUMENTS})
            if self.schedule is None and hasattr(rule, "check_learning_rate"):
                rule.check_learning_rate(self.learning_rate)
        except (TypeError, ValueError) as error:
            names = (*self.OWN_ARGUMENTS, "learning_rate")
            raise type(error)(in_config(str(error), names)) from None

    def keras_arguments(self) -> dict[str, Any]:
        """The arguments the member's class takes as they are (the schedule is instantiated
        apart)."""
        skipped = ("schedule", "exclude_from_weight_decay", "class_name")
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skipped
        }


def in_config(message: str, names: tuple[str, ...], prefix: str = "optimizer.") -> str:
    """A rule's message with each argument named as the app's config has it (``momentum`` ->
    ``optimizer.momentum``): rules name their arguments as Keras does."""
    pattern = rf"(?<![\w.])({'|'.join(map(re.escape, names))})(?!\w)"
    return re.sub(pattern, rf"{prefix}\1", message)


def member_rule(class_name: str) -> ModuleType | None:
    """The update rule (a module of ``shardadam.rules``) that ``FAMILY[class_name]`` runs, for
    the config's checks (None for a name outside the family)."""
    member = FAMILY.get(class_name)
    return None if member is None else member.RULE


def _constructor_defaults(class_name: str, own_only: bool = True) -> dict[str, Any]:
    """The keyword arguments of ``FAMILY[class_name]`` with their defaults (only the member's
    own, the ones the base optimizer lacks, if ``own_only``)."""
    parameters = inspect.signature(FAMILY[class_name].__init__).parameters
    defaults = {
        name: p.default
        for name, p in parameters.items()
        if name not in ("self", "params", "process_group")
        and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    common = {f.name for f in dataclasses.fields(MemberConfig)}
    return {k: v for k, v in defaults.items() if k not in common} if own_only else defaults


def _field_type(default: Any) -> Any:
    """The schema type of an own argument, from its Keras default (Hydra then turns a YAML 2
    into 2.0 for a float); anything else is left to the rule's checks."""
    for kind in (bool, int, float, str):
        if type(default) is kind:
            return kind
    return Any


def _member_schema(class_name: str) -> type[MemberConfig]:
    """``FAMILY[class_name]``'s schema: a ``MemberConfig`` with that member's defaults, then
    its own arguments."""
    defaults = _constructor_defaults(class_name, own_only=False)
    own = _constructor_defaults(class_name)
    types = typing.get_type_hints(MemberConfig)
    fields = [(k, types[k], field(default=v)) for k, v in defaults.items() if k not in own]
    fields.append(("class_name", str, field(default=class_name)))
    fields += [(k, _field_type(v), field(default=v)) for k, v in own.items()]
    return dataclasses.make_dataclass(
        f"{class_name}Config",
        fields,
        bases=(MemberConfig,),
        namespace={
            "MEMBER": class_name,
            "OWN_ARGUMENTS": tuple(own),
            "__doc__": f"The app's config of {FAMILY[class_name].__name__}: its own arguments "
            f"({', '.join(own) or 'none'}) after the keys every member has (MemberConfig).",
            "__module__": __name__,
        },
    )


MEMBER_CONFIGS: dict[str, type[MemberConfig]] = {name: _member_schema(name) for name in FAMILY}
"""Keras's class name -> the schema of that member's config (``SGDConfig`` for SGD)."""
globals().update({schema.__name__: schema for schema in MEMBER_CONFIGS.values()})  # for pickle

OptimizerConfig = MEMBER_CONFIGS[DEFAULT_MEMBER]
"""ShardedAdam's config (the member a config that names none is for)."""


def optimizer_config(class_name: str) -> type[MemberConfig]:
    """The schema of ``FAMILY[class_name]``'s config."""
    if class_name not in MEMBER_CONFIGS:
        raise ValueError(
            f"Invalid optimizer.class_name: {class_name!r} (expected a member of the family: "
            f"{', '.join(FAMILY)}; optimizer=<name in lower case> picks one)"
        )
    return MEMBER_CONFIGS[class_name]


def _optimizer_schema(values: Any) -> type[MemberConfig]:
    """The schema of an optimizer config given as plain values: its ``class_name``'s."""
    name = values.get("class_name") if isinstance(values, dict) else None
    return optimizer_config(DEFAULT_MEMBER if name is None else name)


def as_optimizer_config(value: Any) -> MemberConfig:
    """A member's config from what ``TrainConfig.optimizer`` was given: one already, null
    (Adam's defaults) or its keys as plain values, ``class_name`` naming the member."""
    if isinstance(value, MemberConfig):
        return value
    if value is None:
        return OptimizerConfig()
    if not isinstance(value, dict):
        raise TypeError(
            f"Invalid optimizer: {value!r} (expected a member's config: "
            "optimizer_config(class_name)(...), or its keys as a dict)"
        )
    schema = _optimizer_schema(value)
    check_known_keys(value, schema, "optimizer.")
    return schema(**value)


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
    stage: int = ShardingOptions.stage
    """ZeRO stage: 1 shards optimizer state; 2 also shards reduced gradients."""
    bucket_cap_mb: float = ShardingOptions.bucket_cap_mb
    """Size of the gradient buckets reduced while backward runs, in MiB."""
    comm: str = ShardingOptions.comm
    """Collectives: auto, native, ring, pairwise or all_reduce (see the README)."""
    overlap_param_gather: bool = ShardingOptions.overlap_param_gather
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

    optimizer: Any = field(default=None, metadata={"schema": _optimizer_schema})
    """A member's config, ``optimizer_config(class_name)`` (null: Adam's defaults). The app's
    ``optimizer/<name>.yaml`` brings its member's schema in through its defaults list."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    model: Any = None
    """An nn.Module to build: ``_target_`` (its import path) and its arguments."""
    data: Any = None
    """A factory returning ``shardadam.datasets.Splits``: ``_target_`` and its arguments."""

    def __post_init__(self) -> None:
        self.optimizer = as_optimizer_config(self.optimizer)
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
    Fields that are dataclasses are checked inside (the optimizer against its member's schema);
    others (``model``, ``data``, a schedule) hold whatever their ``_target_`` takes."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in fields:
            # Another member's argument is no typo (momentum is not ema_momentum misspelt).
            takers = _other_members_hint(schema, key)
            close = [] if takers else difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {where}{close[0]}?)" if close else ""
            raise ValueError(
                f"Unknown key {where}{key}{hint}: {where.rstrip('.') or 'the config'} has "
                f"{', '.join(fields)}{takers}"
            )
        nested = _nested_schema(fields[key], value)
        if nested is not None and isinstance(value, dict):
            check_known_keys(value, nested, f"{where}{key}.")


def _nested_schema(f: dataclasses.Field, value: Any) -> type | None:
    if "schema" in f.metadata:
        return f.metadata["schema"](value)
    if f.default_factory is dataclasses.MISSING:
        return None
    made = f.default_factory()
    return type(made) if dataclasses.is_dataclass(made) else None


def _other_members_hint(schema: type, key: str) -> str:
    """Where ``key`` is another member's argument: which members take it."""
    if not issubclass(schema, MemberConfig):
        return ""
    takers = [n for n, c in MEMBER_CONFIGS.items() if key in c.__dataclass_fields__]
    if not takers:
        return ""
    return (
        f" ({key} is an argument of {', '.join(takers)}, not of {schema.MEMBER}; "
        f"optimizer=<name> picks the member, e.g. optimizer={takers[0].lower()})"
    )
