"""The training app's schema (shardadam.config) against what it configures."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

import shardadam
from shardadam import ShardedAdam
from shardadam.app_config import (
    RESUME_AUTO,
    DistributedConfig,
    OptimizerConfig,
    TrainConfig,
    TrainerConfig,
    check_known_keys,
)
from shardadam.config import ShardingOptions

CONFIGS = Path(shardadam.__file__).parent / "configs"


def test_optimizer_config_mirrors_the_constructor():
    parameters = inspect.signature(ShardedAdam.__init__).parameters
    keras = {
        name: p.default
        for name, p in parameters.items()
        if name not in ("self", "params", "process_group")
        and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    assert OptimizerConfig().keras_arguments() == keras


def test_distributed_config_mirrors_the_sharding_options():
    options = DistributedConfig().sharding_options()
    assert options == {k: getattr(ShardingOptions(), k) for k in options}


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TrainerConfig(steps=0), r"Invalid trainer.steps: 0 \(expected an integer >= 1\)"),
        (lambda: TrainerConfig(keep_last=0), "Invalid trainer.keep_last: 0"),
        (lambda: DistributedConfig(backend="mpi"), r"Invalid distributed.backend: 'mpi'"),
        (
            lambda: DistributedConfig(stage=3),
            r"Invalid distributed.stage: 3 \(expected one of \(1, 2\)\)",
        ),
        (lambda: OptimizerConfig(learning_rate=-1.0), "Invalid optimizer.learning_rate: -1.0"),
        # Every argument the constructor checks, named as the user wrote it.
        (
            lambda: OptimizerConfig(beta_1=1.5),
            r"Invalid optimizer.beta_1: 1.5 \(expected 0 <= optimizer.beta_1 < 1\)",
        ),
        (lambda: OptimizerConfig(epsilon=-1.0), r"Invalid optimizer.epsilon: -1.0"),
        (lambda: OptimizerConfig(clipnorm=0.0), r"Invalid optimizer.clipnorm: 0.0"),
        (lambda: OptimizerConfig(ema_momentum=2.0), r"Invalid optimizer.ema_momentum: 2.0"),
        (
            lambda: OptimizerConfig(gradient_accumulation_steps=1),
            r"Invalid optimizer.gradient_accumulation_steps: 1",
        ),
        (
            lambda: OptimizerConfig(clipnorm=1.0, global_clipnorm=1.0),
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set",
        ),
        (lambda: DistributedConfig(comm="mpi"), r"Invalid distributed.comm: 'mpi'"),
        (lambda: TrainerConfig(resume="true"), r"Invalid trainer.resume: 'true' \(expected null"),
        (lambda: TrainerConfig(resume=False), r"Invalid trainer.resume: False"),
        (lambda: TrainConfig(model={"in_features": 3}), "model._target_ is missing"),
    ],
)
def test_bad_values_are_refused_when_the_config_is_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_every_field_is_documented():
    for schema in (OptimizerConfig, TrainerConfig, DistributedConfig):
        source = inspect.getsource(schema)
        for field in dataclasses.fields(schema):
            after = source.split(f"    {field.name}:", 1)[1].splitlines()[1].strip()
            assert after.startswith('"""'), f"{schema.__name__}.{field.name} has no docstring"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optimizer": {"learing_rate": 0.1}}, r"Unknown key optimizer.learing_rate \(did you "
         r"mean optimizer.learning_rate\?\): optimizer has learning_rate, schedule, beta_1"),
        ({"trainer": {"step": 3}}, r"Unknown key trainer.step \(did you mean trainer.steps\?\)"),
        ({"distributed": {"zero": 2}}, r"Unknown key distributed.zero: distributed has backend"),
        ({"optimiser": {}}, r"Unknown key optimiser \(did you mean optimizer\?\): the config"),
    ],
)  # fmt: skip
def test_keys_the_schema_lacks_are_refused_with_the_known_keys(values, message):
    with pytest.raises(ValueError, match=message):
        check_known_keys(values)


def test_model_data_and_schedule_take_any_key():
    check_known_keys(
        {
            "model": {"_target_": "m.M", "anything": 1},
            "data": {"x": {"y": 2}},
            "optimizer": {"schedule": {"_target_": "s.S", "whatever": 3}},
        }
    )


def test_defaults_have_one_source_the_yaml_sets_only_what_the_recipe_changes():
    """The schema holds every default: no YAML restates one (they drifted apart before)."""
    assert not (CONFIGS / "trainer").exists() and not (CONFIGS / "distributed").exists()
    recipe = yaml.safe_load((CONFIGS / "optimizer" / "adam.yaml").read_text())
    defaults = dataclasses.asdict(OptimizerConfig())
    restated = {k: v for k, v in recipe.items() if defaults[k] == v}
    assert not restated, f"optimizer/adam.yaml restates the defaults {restated}"
    assert TrainerConfig().resume is None and RESUME_AUTO == "auto"
