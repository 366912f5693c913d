"""The training app's schema (shardadam.config) against what it configures."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from shardadam import ShardedAdam
from shardadam.config import (
    DistributedConfig,
    OptimizerConfig,
    ShardingOptions,
    TrainConfig,
    TrainerConfig,
)


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
        (lambda: DistributedConfig(stage=3), r"Invalid stage: 3 \(expected one of \(1, 2\)\)"),
        (lambda: OptimizerConfig(learning_rate=-1.0), "Invalid optimizer.learning_rate: -1.0"),
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
