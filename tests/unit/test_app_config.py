"""The training app's schema (shardadam.app_config) against what it configures, and each
member of the family as ``optimizer=<name>`` (composed by Hydra as the app composes it)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from shardadam import FAMILY, train
from shardadam.app_config import (
    RESUME_AUTO,
    DistributedConfig,
    MemberConfig,
    OptimizerConfig,
    TrainConfig,
    TrainerConfig,
    check_known_keys,
    in_config,
    optimizer_config,
)
from shardadam.config import ShardingOptions

CONFIGS = train.CONFIG_DIR
MLP = ["model=mlp_classifier", "data=teacher_classification"]
ALLOWED = "optimizer has learning_rate, schedule, weight_decay, exclude_from_weight_decay"


def compose_app(*overrides: str):
    """The config the app composes for these command-line overrides."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose("config", overrides=list(overrides))


def recipe(class_name: str) -> dict:
    """What optimizer/<name>.yaml sets besides its defaults list (its schema)."""
    text = (CONFIGS / "optimizer" / f"{class_name.lower()}.yaml").read_text()
    return {k: v for k, v in yaml.safe_load(text).items() if k != "defaults"}


def keras_defaults(class_name: str) -> dict:
    parameters = inspect.signature(FAMILY[class_name].__init__).parameters
    return {
        name: p.default
        for name, p in parameters.items()
        if name not in ("self", "params", "process_group")
        and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


@pytest.mark.parametrize("class_name", list(FAMILY))
def test_each_members_config_mirrors_its_constructor(class_name):
    schema = optimizer_config(class_name)
    assert schema().keras_arguments() == keras_defaults(class_name)
    assert schema().class_name == class_name
    assert OptimizerConfig is optimizer_config("Adam")


def test_every_member_of_the_family_has_an_optimizer_config():
    missing = [n for n in FAMILY if not (CONFIGS / "optimizer" / f"{n.lower()}.yaml").exists()]
    assert not missing, (
        f"no shardadam/configs/optimizer/<name>.yaml for {missing}: copy sgd.yaml, naming the "
        "member's schema in its defaults list"
    )


@pytest.mark.parametrize("class_name", list(FAMILY))
def test_optimizer_name_builds_that_member_with_keras_defaults(class_name):
    """optimizer=<name> with a constant learning rate builds FAMILY[name] as its constructor's
    defaults do (Keras's), with what its YAML sets: the app's recipe for Adam, nothing else."""
    if class_name != "Adam":
        assert recipe(class_name) == {}, "a member's YAML holds Keras's defaults (its schema's)"
    config = train.config_from(compose_app(f"optimizer={class_name.lower()}",
                                           "~optimizer/schedule", *MLP))  # fmt: skip
    assert type(config.optimizer) is optimizer_config(class_name)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    built = train._build_optimizer(config, model)
    assert type(built) is FAMILY[class_name]
    arguments = {k: v for k, v in recipe(class_name).items() if k != "exclude_from_weight_decay"}
    expected = FAMILY[class_name](list(model.named_parameters()), **arguments)
    assert _groups(built) == _groups(expected)
    assert built.options == expected.options and built.sharding == expected.sharding


def _groups(optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


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
        # Another member's own arguments, by its rule's checks, named as the config has them.
        (
            lambda: optimizer_config("SGD")(momentum=2.0),
            r"Invalid optimizer.momentum: 2.0 \(expected optimizer.momentum >= 0.0 and "
            r"optimizer.momentum <= 1.0\)",
        ),
        (
            lambda: optimizer_config("Lion")(beta_1=0.0),
            r"Invalid optimizer.beta_1: 0.0 \(expected optimizer.beta_1 > 0.0",
        ),
        (
            lambda: optimizer_config("Adagrad")(initial_accumulator_value=0.0, epsilon=0.0),
            r"Invalid optimizer.initial_accumulator_value and optimizer.epsilon: both 0",
        ),
        (lambda: optimizer_config("AdamW")(beta_2=1.0), r"Invalid optimizer.beta_2: 1.0"),
        (  # Ftrl divides by it
            lambda: optimizer_config("Ftrl")(learning_rate=0.0),
            r"Invalid optimizer.learning_rate: 0.0 \(Ftrl divides by the learning rate",
        ),
        (lambda: optimizer_config("Sgd"), r"Invalid optimizer.class_name: 'Sgd' \(expected a "),
        (
            lambda: optimizer_config("SGD")(class_name="Adam"),
            r"Invalid optimizer.class_name: 'Adam' in the config of SGD \(expected 'SGD'; pick "
            r"another member with optimizer=adam",
        ),
        (lambda: TrainerConfig(resume="true"), r"Invalid trainer.resume: 'true' \(expected null"),
        (lambda: TrainerConfig(resume=False), r"Invalid trainer.resume: False"),
        (lambda: TrainConfig(model={"in_features": 3}), "model._target_ is missing"),
    ],
)
def test_bad_values_are_refused_when_the_config_is_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_every_field_is_documented():
    for schema in (MemberConfig, TrainerConfig, DistributedConfig):
        source = inspect.getsource(schema)
        for field in dataclasses.fields(schema):
            after = source.split(f"    {field.name}:", 1)[1].splitlines()[1].strip()
            assert after.startswith('"""'), f"{schema.__name__}.{field.name} has no docstring"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optimizer": {"learing_rate": 0.1}}, r"Unknown key optimizer.learing_rate \(did you "
         r"mean optimizer.learning_rate\?\): " + ALLOWED),
        # Each member's own keys: another member's argument is unknown, saying whose it is.
        ({"optimizer": {"class_name": "SGD", "beta_1": 0.9}}, r"Unknown key optimizer.beta_1: "
         + ALLOWED + r".*, class_name, momentum, nesterov \(beta_1 is an argument of Adam, "
         r"AdamW, .*Lion.*, not of SGD; optimizer=<name> picks the member, e.g. optimizer=adam\)"),
        ({"optimizer": {"class_name": "Lion", "betta_2": 0.9}},
         r"Unknown key optimizer.betta_2 \(did you mean optimizer.beta_2\?\): .*, beta_1, beta_2$"),
        ({"optimizer": {"class_name": "Sgd"}}, r"Invalid optimizer.class_name: 'Sgd'"),
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


@pytest.mark.parametrize("class_name", list(FAMILY))
def test_defaults_have_one_source_the_yaml_sets_only_what_the_recipe_changes(class_name):
    """The schema holds every default, each member's from its constructor: no YAML restates
    one (they drifted apart before)."""
    assert not (CONFIGS / "trainer").exists() and not (CONFIGS / "distributed").exists()
    defaults = dataclasses.asdict(optimizer_config(class_name)())
    restated = {k: v for k, v in recipe(class_name).items() if defaults[k] == v}
    assert not restated, f"optimizer/{class_name.lower()}.yaml restates the defaults {restated}"
    assert TrainerConfig().resume is None and RESUME_AUTO == "auto"


def test_a_train_config_takes_any_members_config_or_its_keys():
    targets = {"model": {"_target_": "m.M"}, "data": {"_target_": "d.D"}}
    assert TrainConfig(**targets).optimizer == OptimizerConfig()
    lion = TrainConfig(**targets, optimizer={"class_name": "Lion", "beta_1": 0.5}).optimizer
    assert lion == optimizer_config("Lion")(beta_1=0.5)
    with pytest.raises(ValueError, match=r"Unknown key optimizer.momentum: optimizer has"):
        TrainConfig(**targets, optimizer={"class_name": "Lion", "momentum": 0.5})


# ---------------------------------------------------------------------- as the app composes


@pytest.mark.parametrize(
    "arguments",
    [
        ["optimizer=sgd", "optimizer.beta_1=0.9"],
        ["optimizer=sgd", "+optimizer.beta_1=0.9"],
        ["--multirun", "optimizer=lion,sgd", "optimizer.beta_1=0.9"],  # each member swept
        ["optimizer.momentum=0.9"],  # config.yaml's member, Adam
    ],
)
def test_a_key_the_members_schema_lacks_is_refused_before_composing(arguments):
    with pytest.raises(ValueError, match=r"Unknown key optimizer\.(beta_1|momentum): " + ALLOWED):
        train._check_override_keys(arguments)


def test_only_composing_tells_the_member_of_a_users_own_config():
    train._check_override_keys(["optimizer=my_recipe", "optimizer.momentum=0.9"])
    train._check_override_keys(["-cn", "my_config", "optimizer.momentum=0.9"])


def test_a_key_added_to_a_members_config_is_refused_once_composed():
    cfg = compose_app("optimizer=sgd", "+optimizer.beta_1=0.9", *MLP)  # Hydra adds it
    with pytest.raises(ValueError, match=r"Unknown key optimizer.beta_1: " + ALLOWED):
        train.config_from(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["optimizer=sgd", "optimizer.momentum=2"],  # the schema makes it 2.0, as Keras wants
            r"Invalid optimizer.momentum: 2.0 \(expected optimizer.momentum >= 0.0 and "
            r"optimizer.momentum <= 1.0\)",
        ),
        (["optimizer=rmsprop", "optimizer.rho=-0.5"], r"Invalid optimizer.rho: -0.5"),
        (
            ["optimizer.class_name=SGD"],  # the adam config, told it is SGD's
            r"Invalid optimizer.class_name: 'SGD' in the config of Adam \(expected 'Adam'; pick "
            r"another member with optimizer=sgd",
        ),
    ],
)
def test_a_bad_value_of_a_member_is_refused_once_composed(overrides, message):
    with pytest.raises(ValueError, match=message):
        train.config_from(compose_app(*overrides, *MLP))


def test_ftrl_refuses_the_default_schedules_first_rate_before_training():
    """It divides by the learning rate, and the app's warmup starts from 0."""
    config = train.config_from(compose_app("optimizer=ftrl", *MLP))
    with pytest.raises(ValueError, match=r"Invalid learning_rate \(optimizer.schedule's, at "
                       r"step 1\): 0.0 .*; pick a schedule that starts above 0"):  # fmt: skip
        train._build_optimizer(config, torch.nn.Linear(3, 2))
    exponential = compose_app("optimizer=ftrl", "optimizer/schedule=exponential", *MLP)
    train._build_optimizer(train.config_from(exponential), torch.nn.Linear(3, 2))


def test_rule_messages_name_the_arguments_as_the_config_does():
    message = "Invalid beta_1: 2 (expected 0 <= beta_1 < 1; not beta_10, x.beta_1 or the beta)"
    assert in_config(message, ("beta_1", "beta")) == (
        "Invalid optimizer.beta_1: 2 (expected 0 <= optimizer.beta_1 < 1; not beta_10, "
        "x.beta_1 or the optimizer.beta)"
    )


def test_a_users_config_without_a_schema_is_its_members(tmp_path):
    """A file of the user's own in optimizer/ that brings in no schema: its class_name's."""
    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "mine.yaml").write_text("class_name: Lion\nbeta_1: 0.5\n")
    cfg = compose_app(f"hydra.searchpath=[file://{tmp_path}]", "optimizer=mine", *MLP)
    optimizer = train.config_from(cfg).optimizer
    assert optimizer == optimizer_config("Lion")(beta_1=0.5, schedule=optimizer.schedule)
    assert optimizer.schedule["warmup_target"] == optimizer.learning_rate == 0.001


def test_resuming_with_a_member_of_another_rule_is_refused_naming_the_checkpoints():
    with pytest.raises(ValueError, match=r"Invalid optimizer.class_name: 'SGD' on resume, but "
                       r"the checkpoint ckpt was trained with 'Adam'.*optimizer=adam"):  # fmt: skip
        train._check_same_member({"optimizer": {"class_name": "Adam"}}, "SGD", Path("ckpt"))
    train._check_same_member({"optimizer": {}}, "Adam", Path("ckpt"))  # recorded before SGD
    train._check_same_member({"optimizer": {"class_name": "Adam"}}, "AdamW", Path("ckpt"))


def test_keys_the_schemas_have_pass_before_composing():
    train._check_override_keys([
        "optimizer=sgd", "optimizer.momentum=0.9", "+optimizer.schedule.alpha=0.0",
        "data=teacher_classification", "~model",
        "+model={_target_:torch.nn.Linear,in_features:16,out_features:4}", "model.bias=false",
    ])  # fmt: skip
