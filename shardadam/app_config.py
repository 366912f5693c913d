"""The training app's schema: the dataclasses Hydra composes ``shardadam/configs/`` over (in
``train.py``), with every default the app uses (the YAML files set only what a recipe changes).

Hydra checks keys and types against these dataclasses when it composes a config, except for keys
added with ``+``, which :func:`check_known_keys` refuses; converting to them runs the checks
below (the optimizer's own, naming each value as the user wrote it), before anything starts.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from .config import (
    BACKENDS,
    OptimizerOptions,
    ShardingOptions,
    check_bool,
    check_clip_exclusive,
    check_group,
    check_number_range,
    check_optimizer_options,
    check_positive_int,
    check_sharding_options,
)

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
