"""The training app: ``python -m shardadam.train [overrides]`` (or ``shardadam-train``).

Hydra composes ``shardadam/configs/config.yaml`` over the schema in ``shardadam.app_config``
(an unknown key or a wrong type fails before anything starts). Every rank then builds the model
and data named by their ``_target_``, trains the trainable parameters with the member of the
family that ``optimizer`` configures (``optimizer=<name>``; ShardedAdam by default) and
evaluates on the held-out split (the EMA weights too where ``optimizer.use_ema``). Rank 0
writes into the run's output directory: the config (``.hydra/``), ``metrics.jsonl``,
``train.log``, ``loss.png``, TensorBoard events if asked; every rank writes its part of each
checkpoint. A resumed run takes its state from the checkpoint and its settings from the config
(Note [the resume rule] in ``shardadam.resume``).

Ranks come from torchrun, MPI or Slurm (``shardadam.bootstrap``); see ``launch/``. This is the
only module that imports Hydra: the rest of shardadam takes plain dataclasses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import checkpoint
from .app_config import (
    DEFAULT_MEMBER,
    MEMBER_CONFIGS,
    RESUME_AUTO,
    MemberConfig,
    TrainConfig,
    check_known_keys,
    member_rule,
    optimizer_config,
)
from .batches import Batch, TrainBatches, eval_batches, forward
from .bootstrap import DistributedContext
from .datasets import check_splits
from .losses import HeldOutTotal, TrainingLoss, rank_loss
from .model_sync import broadcast_buffers, check_same_weights
from .optimizer import ShardedOptimizer
from .optimizers import FAMILY
from .preemption import PREEMPTED_EXIT_CODE, PreemptionSignals
from .process_group import distributed_job
from .reporting import Reporter
from .resume import (
    ConfiguredHyperparameters,
    check_state_settings,
    config_record,
    differences,
    restore_rng_states,
    resume_source,
    rng_states,
)
from .schedules import LearningRateSchedule
from .startup import check_writable, decide_resume, shared_output_dir

# Inside the package, so that an installed wheel has them (package data, see pyproject.toml).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

ConfigStore.instance().store(name="schema", node=TrainConfig)
# Each member's schema, which configs/optimizer/<name>.yaml brings in through its defaults list.
for _class_name, _schema in MEMBER_CONFIGS.items():
    ConfigStore.instance().store(group="schema/optimizer", name=_class_name.lower(), node=_schema)
# For schedule configs sized from trainer.steps (configs/optimizer/schedule/).
OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b), replace=True)


def main() -> None:
    """``shardadam-train`` and ``python -m shardadam.train``: the same start either way."""
    # `python -m` puts the working directory first on sys.path, a console script does not:
    # both import the user's model modules from where they run.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        _check_override_keys(sys.argv[1:])
    except ValueError as error:
        print(f"Error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    _run_hydra()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _run_hydra(cfg: DictConfig) -> float:
    """Hydra's task: the composed config as dataclasses, then ``train``."""
    return train(config_from(cfg), Path(HydraConfig.get().runtime.output_dir))


def config_from(cfg: DictConfig) -> TrainConfig:
    """A composed config as the app's dataclasses: a key its schema lacks is refused, then
    converting runs every check."""
    schema = OmegaConf.get_type(cfg, "optimizer")
    if isinstance(schema, type) and issubclass(schema, MemberConfig):
        # Before the keys, which are checked against the member that class_name names.
        schema.check_class_name(cfg.optimizer.get("class_name"))
    check_known_keys(OmegaConf.to_container(cfg, resolve=False))
    if schema is dict:  # a config of the user's that brings in no schema: its member's
        members = optimizer_config(cfg.optimizer.get("class_name", DEFAULT_MEMBER))
        cfg.optimizer = OmegaConf.merge(OmegaConf.structured(members), cfg.optimizer)
    return OmegaConf.to_object(cfg)


# Hydra's flags that take a value as the next argument (an override always has a "=").
_FLAGS_WITH_VALUE = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir"}
_FLAGS_WITH_VALUE |= {"-c", "--cfg", "-p", "--package", "-i", "--info", "--experimental-rerun"}
# Hydra's flags that pick another primary config, whose optimizer may be another member.
_FLAGS_CHANGING_PRIMARY = {"-cn", "--config-name", "-cp", "--config-path"}


def _check_override_keys(arguments: list[str]) -> None:
    """Refuse an override of a key the schema lacks, before Hydra composes anything: Hydra
    adds a ``+key`` without a word, and its own error for a plain one lists no known keys.
    ``optimizer.*`` keys are checked against the member the command line picks, where it
    says (``optimizer=sgd``, or nothing: config.yaml's); a config of the user's own
    (``optimizer=my_recipe``) is checked once composed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides, flags, previous = [], set(), ""
    for argument in arguments:
        takes_this = previous in _FLAGS_WITH_VALUE and "=" not in argument
        if not takes_this and not argument.startswith("-"):
            overrides.append(argument)
        elif argument.startswith("-"):
            flags.add(argument.split("=", 1)[0])
        previous = "" if takes_this else argument
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports a malformed override itself, with its own words
        return
    options, keys = None, []
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or "/" in key or key.startswith("hydra."):
            continue
        if key == "optimizer":  # the config group: which member's config
            options = _override_values(override)
        else:
            keys.append(key)
    members = _members_picked(options, primary_changed=bool(flags & _FLAGS_CHANGING_PRIMARY))
    for key in keys:
        nested: dict[str, Any] = {}
        *parents, leaf = key.split(".")
        level = nested
        for part in parents:
            level = level.setdefault(part, {})
        level[leaf] = None
        if "optimizer" not in nested:
            check_known_keys(nested)
            continue
        for class_name in (m for m in members if m is not None):
            check_known_keys({"optimizer": {**nested["optimizer"], "class_name": class_name}})


def _override_values(override: Any) -> list[str]:
    """An override's value, or each value of a sweep (``optimizer=sgd,lion``)."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    value = override.value()
    return [] if value is None else [str(value)]


def _members_picked(options: list[str] | None, primary_changed: bool) -> list[str | None]:
    """The members the optimizer configs ``options`` are for (None where only composing can
    tell: a config of the user's own); no options: the default config's choice."""
    if options is None:
        if primary_changed:
            return [None]
        defaults = OmegaConf.load(CONFIG_DIR / "config.yaml").defaults
        options = [e.optimizer for e in defaults if isinstance(e, DictConfig) and "optimizer" in e]
    by_option = {class_name.lower(): class_name for class_name in FAMILY}
    return [by_option.get(option) for option in options]


def train(config: TrainConfig, output_dir: Path) -> float:
    """Train on every rank; returns the final held-out loss (of the EMA weights if kept).

    The jobs of a sweep share one process group (Note [one process group per process]). On
    SIGUSR1 or SIGTERM the run saves a checkpoint and exits with PREEMPTED_EXIT_CODE
    (``shardadam.preemption``)."""
    distributed = config.distributed
    with (
        distributed_job(
            backend=distributed.backend,
            expected_world_size=distributed.world_size,
            timeout_s=distributed.timeout_s,
        ) as ctx,
        PreemptionSignals(ctx) as preemption,
    ):
        _set_threads(config.trainer.threads, ctx)
        output_dir = shared_output_dir(output_dir, ctx, config.trainer.checkpoint_dir)
        return _Run(config, output_dir, ctx).train(preemption)


class _Run:
    """One training run on one rank: model, data, optimizer, and what it reports."""

    def __init__(self, config: TrainConfig, output_dir: Path, ctx: DistributedContext) -> None:
        self.config, self.trainer, self.ctx = config, config.trainer, ctx
        self.output_dir = output_dir
        if self.trainer.batch_size % ctx.world_size:
            raise ValueError(
                f"Invalid trainer.batch_size: {self.trainer.batch_size} does not split evenly "
                f"over {ctx.world_size} ranks (use a multiple of {ctx.world_size})"
            )
        if self.trainer.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ModuleNotFoundError(
                "trainer.tensorboard=true needs the tensorboard package: pip install "
                "tensorboard, or set trainer.tensorboard=false"
            )
        torch.manual_seed(self.trainer.seed)  # the same initial model on every rank
        self.model = _instantiate(config.model, "model", torch.nn.Module).to(ctx.device)
        self.data = _instantiate(config.data, "data", object)
        check_splits(self.data)
        if len(self.data.train) < self.trainer.batch_size:
            raise ValueError(
                f"Invalid trainer.batch_size: {self.trainer.batch_size} is more than the "
                f"{len(self.data.train)} samples of the training split"
            )
        loss_spec = self.trainer.loss  # null: the model's own loss or the data's
        custom_loss = None if loss_spec is None else _instantiate(loss_spec, "trainer.loss", object)
        self.loss = TrainingLoss(self.data.loss, self.trainer.ignore_index, custom_loss)
        self.train_batches = TrainBatches(
            self.data.train, self.trainer.batch_size, self.trainer.seed, ctx.rank,
            ctx.world_size, self.trainer.steps, self.trainer.num_workers, ctx.device,
        )  # fmt: skip
        self.optimizer = _build_optimizer(config, self.model)
        check_same_weights(self.model, ctx)
        self.checkpoint_dir = output_dir / self.trainer.checkpoint_dir
        self.reporter = Reporter(config, output_dir, ctx, self.data.items_per_sample)

    def train(self, preemption: PreemptionSignals | None = None) -> float:
        trainer, ctx = self.trainer, self.ctx
        start = self._resume()
        self.reporter.start(start, self.model, self.optimizer)
        broadcast_buffers(self.model, ctx)  # Note [buffers across ranks]
        losses = self.evaluate()
        self.reporter.evaluated(start, losses, first=True)
        if start >= trainer.steps:
            self.reporter.say(
                f"the checkpoint is at step {start}, trainer.steps={trainer.steps}: nothing "
                "left to train"
            )
        self.model.train()
        for step in range(start + 1, trainer.steps + 1):
            if self.config.distributed.broadcast_buffers:
                broadcast_buffers(self.model, ctx)
            began = time.perf_counter()
            loss = self._train_step(step)
            loss, stop = _step_agreement(loss.detach(), preemption, ctx)
            self.reporter.stepped(step, loss, self.optimizer, time.perf_counter() - began)
            if step == trainer.steps or (trainer.eval_every and step % trainer.eval_every == 0):
                broadcast_buffers(self.model, ctx)
                losses = self.evaluate()
                self.reporter.evaluated(step, losses)
            saved = step == trainer.steps or (
                trainer.checkpoint_every and step % trainer.checkpoint_every == 0
            )
            if saved:
                self._save(step)
            if stop and step < trainer.steps:
                if not saved:
                    self._save(step)
                self.reporter.say(preemption.stopping(step, self.checkpoint_dir))
                self.reporter.finish()
                raise SystemExit(PREEMPTED_EXIT_CODE)
        self.reporter.finish()
        return losses.get("ema", losses["weights"])

    def _train_step(self, step: int) -> torch.Tensor:
        """Collective: one step; returns this rank's loss, whose mean over ranks is the step's
        loss (Note [loss averaging across ranks] in shardadam.losses)."""
        batch = self._batch(step)
        terms = self.loss.terms(forward(self.model, batch), batch.targets, batch.labels_given)
        loss = rank_loss(terms, self.ctx.world_size)
        self.optimizer.scale_loss(loss).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss

    def _batch(self, step: int) -> Batch:
        """This rank's share of step ``step``'s global batch, a function of (seed, step) only
        (Note [batches from (seed, step)] in shardadam.batches)."""
        return self.train_batches.at(step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Collective: mean held-out loss of the weights, and of their EMA if kept."""
        losses = {"weights": self._held_out_loss()}
        if self.config.optimizer.use_ema and self.optimizer.iterations > 0:
            with self.optimizer.swap_moving_averages():
                losses["ema"] = self._held_out_loss()
        return losses

    def _held_out_loss(self) -> float:
        """Collective: the loss over the first trainer.eval_samples held-out samples, each
        rank evaluating its contiguous share."""
        self.model.eval()
        total = HeldOutTotal(self.ctx.device)
        trainer, ctx = self.trainer, self.ctx
        for batch in eval_batches(
            self.data.eval, trainer.eval_samples, trainer.batch_size, ctx.rank,
            ctx.world_size, trainer.num_workers, ctx.device,
        ):  # fmt: skip
            output = forward(self.model, batch)
            total.add(self.loss.terms(output, batch.targets, batch.labels_given), batch.samples)
        self.model.train()
        return total.mean(ctx.world_size)

    def _resume(self) -> int:
        """Collective: load the checkpoint ``trainer.resume`` names, if any, with the config's
        settings over the checkpoint's (Note [the resume rule]); the step to continue after."""
        source = resume_source(self.trainer, self.checkpoint_dir)
        if source is None:
            return 0
        where, required = source
        path = decide_resume(where, self.ctx, required)
        if path is None:
            self.reporter.say(f"no checkpoint in {where}: starting from step 0")
            return 0
        # Checked before anything changes: the config the checkpoint was trained with.
        saved = checkpoint.read_extra(path).get("config")
        changed = {} if saved is None else differences(saved, config_record(self.config))
        if saved is not None:
            _check_same_member(saved, self.config.optimizer.class_name, path)
        check_state_settings(changed)
        configured = ConfiguredHyperparameters(
            self.optimizer, self.config.optimizer.exclude_from_weight_decay
        )
        info = checkpoint.load(path, model=self.model, optimizer=self.optimizer)
        configured.restore(self.optimizer)
        if not restore_rng_states(info.extra, self.ctx.device):
            self.reporter.say(f"{info.path} holds no RNG states: drawing on from trainer.seed")
        if info.step >= self.trainer.steps and self.trainer.resume != RESUME_AUTO:
            raise ValueError(
                f"Invalid trainer.steps: {self.trainer.steps}, but the checkpoint {info.path} is "
                f"at step {info.step}: nothing would be trained (set trainer.steps to more "
                f"than {info.step})"
            )
        self._report_resume(info, changed, recorded=saved is not None)
        return info.step

    def _report_resume(
        self, info: checkpoint.CheckpointInfo, changed: dict[str, Any], recorded: bool
    ) -> None:
        self.reporter.say(
            f"resumed from {info.path} at step {info.step} (saved on {info.world_size} ranks)"
        )
        for key, (before, now) in changed.items():
            self.reporter.say(f"  {key}: {now!r} (the checkpoint's: {before!r})")
        if not recorded:
            self.reporter.say("  the checkpoint records no config: settings are the config's")
        if self.ctx.is_main:
            record = {"checkpoint": str(info.path), "step": info.step, "changed": changed}
            (self.output_dir / "resumed.json").write_text(json.dumps(record, indent=1) + "\n")

    def _save(self, step: int) -> None:
        broadcast_buffers(self.model, self.ctx)  # Note [buffers across ranks]
        checkpoint.save(
            self.checkpoint_dir,
            model=self.model,
            optimizer=self.optimizer,
            step=step,
            extra={"rng": rng_states(self.ctx.device), "config": config_record(self.config)},
            keep_last=self.trainer.keep_last,
        )


# ---------------------------------------------------------------------- building blocks


def _check_same_member(saved: dict[str, Any], class_name: str, path: Path) -> None:
    """A checkpoint's optimizer state is its rule's (checkpoints from before the family record
    no member: Adam's), so only a member of the same rule resumes it (Adam and AdamW); checked
    before the settings that decide which state exists, which differ between members too."""
    trained = saved.get("optimizer", {}).get("class_name", DEFAULT_MEMBER)
    rule = member_rule(trained)
    if trained == class_name or (rule is not None and rule is member_rule(class_name)):
        return
    raise ValueError(
        f"Invalid optimizer.class_name: {class_name!r} on resume, but the checkpoint {path} was "
        f"trained with {trained!r}, whose optimizer state {class_name} cannot take (resume with "
        f"optimizer={trained.lower()}, or start afresh)"
    )


def _instantiate(spec: dict[str, Any], name: str, kind: type) -> Any:
    built = hydra.utils.instantiate(spec, _convert_="all")
    if not isinstance(built, kind):
        raise TypeError(
            f"{name}._target_={spec['_target_']!r} built a {type(built).__name__}; expected "
            f"{'an nn.Module' if kind is torch.nn.Module else 'an object'}"
        )
    return built


def _build_optimizer(config: TrainConfig, model: torch.nn.Module) -> ShardedOptimizer:
    """The member of the family ``config.optimizer`` is for, over the trainable parameters."""
    settings = config.optimizer
    arguments = settings.keras_arguments()
    if settings.schedule is not None:
        schedule = hydra.utils.instantiate(settings.schedule, _convert_="all")
        _check_first_rate(schedule, settings.class_name)
        arguments["learning_rate"] = schedule
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"the model ({type(model).__name__}) has no parameter with requires_grad=True: "
            "there is nothing to train"
        )
    # Frozen parameters get no optimizer state (they are saved with the model all the same).
    member = FAMILY[settings.class_name]
    optimizer = member(trainable, **arguments, **config.distributed.sharding_options())
    if settings.exclude_from_weight_decay:
        optimizer.exclude_from_weight_decay(var_names=settings.exclude_from_weight_decay)
    return optimizer


def _check_first_rate(schedule: Any, class_name: str) -> None:
    """A rule that divides by the learning rate (Ftrl) refuses a 0 at the step that takes it;
    the app's default schedule starts with one, so refuse it now, saying what to pick."""
    rule = member_rule(class_name)
    if not isinstance(schedule, LearningRateSchedule) or not hasattr(rule, "check_learning_rate"):
        return
    try:
        rule.check_learning_rate(float(schedule(0)), " (optimizer.schedule's, at step 1)")
    except ValueError as error:
        raise ValueError(
            f"{error}; pick a schedule that starts above 0 (optimizer/schedule=exponential) or "
            "none ('~optimizer/schedule')"
        ) from None


def _set_threads(threads: int | None, ctx: DistributedContext) -> None:
    if threads is None and ctx.world_size > 1 and ctx.device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // ctx.world_size)
    if threads is not None:
        torch.set_num_threads(threads)


class CheckOutputDir(Callback):
    """Hydra callback (configs/config.yaml): refuse an output directory that cannot be
    written, with what to change, before Hydra tries to make it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._exit_unless_writable(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._exit_unless_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")

    @staticmethod
    def _exit_unless_writable(directory: Path, setting: str) -> None:
        try:
            check_writable(directory, setting)
        except PermissionError as error:
            # Hydra turns a callback's exceptions into warnings and goes on; stop here.
            print(f"Error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None


def _step_agreement(
    loss: torch.Tensor, preemption: PreemptionSignals | None, ctx: DistributedContext
) -> tuple[float, bool]:
    """Collective (one small all_reduce, one host sync per step): the step's loss, the mean of
    the ranks' shares, and whether any rank received a pre-termination signal."""
    flags = preemption.flags() if preemption is not None else []
    values = torch.cat([loss.reshape(1).double(), loss.new_tensor(flags, dtype=torch.float64)])
    if ctx.world_size > 1:
        dist.all_reduce(values)
    loss_sum, *summed = values.tolist()
    stop = preemption.agree(summed) if preemption is not None else False
    return loss_sum / ctx.world_size, stop


if __name__ == "__main__":
    main()
