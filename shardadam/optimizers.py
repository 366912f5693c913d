"""The public optimizers: each is the sharded engine (``ShardedOptimizer``) with one update rule
of ``shardadam.rules`` and Keras 3's arguments for it."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import torch

from .optimizer import ShardedOptimizer
from .rules import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    ftrl,
    lamb,
    lion,
    nadam,
    rmsprop,
    sgd,
)
from .state import AVERAGE, MOMENTUM, VELOCITY, VELOCITY_HAT


class ShardedAdam(ShardedOptimizer):
    """Adam with Keras 3's semantics, whose state is sharded across the ranks of a group.

    Update rule (Keras's, see ``shardadam.rules.adam``): per step t, after unscaling
    (``loss_scale_factor``), gradient accumulation and clipping, ``p *= 1 -
    weight_decay*lr``; ``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*g^2``;
    ``p -= lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+epsilon)`` (AMSGrad: v replaced by its
    running max); then the EMA ``avg = m*avg + (1-m)*p`` (``avg = p`` at the first step).

    Communication, sharding and the state dict: see ``ShardedOptimizer``. Param groups keep
    torch's Adam keys (``betas``, ``eps``, ``amsgrad``); the state's slots are Keras's
    ``momentum``, ``velocity`` and ``velocity_hat``.
    """

    RULE = adam

    def __init__(
        self,
        params: Iterable[Any],
        learning_rate: Any = adam.LEARNING_RATE,
        beta_1: Any = 0.9,
        beta_2: Any = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        jit_compile: bool = True,
        name: str = adam.NAME,
        process_group: object | None = None,
        **sharding_options: Any,
    ) -> None:
        super().__init__(
            params,
            adam,
            {"beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon, "amsgrad": amsgrad},
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            jit_compile=jit_compile,
            name=name,
            process_group=process_group,
            **sharding_options,
        )

    def load_torch_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Import the state of a ``torch.optim.Adam`` or ``AdamW`` over the same parameters.

        The moments carry over as they are (torch and Keras update m and v alike) and the step
        count becomes ``iterations``; this optimizer keeps its own hyperparameters. torch's
        ``eps`` is not imported: Keras's ``epsilon`` sits beside sqrt(v) with the bias
        correction folded into the step size, so torch's eps equals ``epsilon * sqrt(1 -
        beta_2^t)`` at step t and no constant maps one onto the other.
        """
        groups, saved = state_dict.get("param_groups"), state_dict.get("state")
        if groups is None or saved is None or "shardadam" in state_dict:
            raise ValueError(
                "load_torch_state_dict() expects the state_dict() of torch.optim.Adam/AdamW; "
                "use load_state_dict() for a ShardedAdam's"
            )
        counts = [len(g["params"]) for g in groups]
        here = [len(g["params"]) for g in self.param_groups]
        if counts != here:
            raise ValueError(
                f"the torch state_dict has groups of {counts} parameters but this optimizer "
                f"has {here}; import it into an optimizer over the same parameters"
            )
        for index, group in enumerate(groups):
            if group.get("weight_decay", 0) and not group.get("decoupled_weight_decay", True):
                raise ValueError(
                    f"param group {index} of the torch state_dict uses Adam's L2 weight decay "
                    f"(weight_decay={group['weight_decay']}), which Keras's Adam has no "
                    "counterpart for; only the state of AdamW or of Adam without weight decay "
                    "imports"
                )
        steps = {int(float(entry["step"])) for entry in saved.values() if "step" in entry}
        if len(steps) > 1:
            raise ValueError(f"the torch state_dict's parameters are at different steps {steps}")
        name = self.options.name
        params = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for i, p in enumerate(params):
            entry = saved.get(i, {})
            zeros = torch.zeros(p.shape, dtype=torch.float32)
            exp_avg_sq = entry.get("exp_avg_sq", zeros)
            state[i] = {
                f"{name}/{MOMENTUM}": entry.get("exp_avg", zeros),
                f"{name}/{VELOCITY}": exp_avg_sq,
                f"{name}/{VELOCITY_HAT}": entry.get("max_exp_avg_sq", exp_avg_sq),
                # The EMA starts at the parameters, as for a group added mid-training.
                f"{name}/{AVERAGE}": p.detach().float(),
            }
        converted = self.state_dict()
        converted["state"] = state
        converted["shardadam"]["micro_steps"] = (steps.pop() if steps else 0) * (
            self.options.gradient_accumulation_steps or 1
        )
        self.load_state_dict(converted)


# The base optimizer's arguments every member takes after its own, with Keras 3's defaults.
_BASE_ARGUMENTS: dict[str, Any] = {
    "weight_decay": None,
    "clipnorm": None,
    "clipvalue": None,
    "global_clipnorm": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
    "jit_compile": True,
}


def _member(rule: ModuleType, name: str | None = None, **defaults: Any) -> type:
    """The public ``Sharded<name>`` class of ``rule``: Keras's arguments for it (its own, then
    the base optimizer's; ``defaults`` overrides Keras's base defaults, as AdamW's weight
    decay), ``process_group`` and the sharding options."""
    name = name or rule.NAME
    base_defaults = {**_BASE_ARGUMENTS, **defaults}

    def __init__(
        self: ShardedOptimizer,
        params: Iterable[Any],
        learning_rate: Any = rule.LEARNING_RATE,
        **arguments: Any,
    ) -> None:
        hyperparameters = {k: arguments.pop(k, v) for k, v in rule.HYPERPARAMETERS.items()}
        base = {k: arguments.pop(k, v) for k, v in base_defaults.items()}
        if "weight_decay" in defaults and base["weight_decay"] is None:
            raise ValueError(
                f"Argument `weight_decay` must be a float for {name}. Received: weight_decay=None"
            )
        ShardedOptimizer.__init__(
            self, params, rule, hyperparameters, learning_rate,
            name=arguments.pop("name", name), **base, **arguments,
        )  # fmt: skip

    keyword = inspect.Parameter.KEYWORD_ONLY
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter(
                "learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=rule.LEARNING_RATE
            ),
            *(inspect.Parameter(k, keyword, default=v) for k, v in rule.HYPERPARAMETERS.items()),
            *(inspect.Parameter(k, keyword, default=v) for k, v in base_defaults.items()),
            inspect.Parameter("name", keyword, default=name),
            inspect.Parameter("process_group", keyword, default=None),
            inspect.Parameter("sharding_options", inspect.Parameter.VAR_KEYWORD),
        ]
    )
    doc = (
        f"Keras 3's {name} ({rule.__name__}) as a torch optimizer whose state is sharded "
        f"across the ranks of a group; see ShardedOptimizer.\n\n{(rule.__doc__ or '').strip()}"
    )
    return type(
        f"Sharded{name}",
        (ShardedOptimizer,),
        {"__init__": __init__, "__doc__": doc, "__module__": __name__, "RULE": rule},
    )


ShardedAdamW = _member(adam, name="AdamW", weight_decay=0.004)
ShardedAdamax = _member(adamax)
ShardedNadam = _member(nadam)
ShardedFtrl = _member(ftrl)
ShardedLion = _member(lion)
ShardedLamb = _member(lamb)
ShardedAdafactor = _member(adafactor)
ShardedSGD = _member(sgd)
ShardedRMSprop = _member(rmsprop)
ShardedAdagrad = _member(adagrad)
ShardedAdadelta = _member(adadelta)

FAMILY: dict[str, type] = {
    cls.__name__.removeprefix("Sharded"): cls
    for cls in (
        ShardedAdam,
        ShardedAdamW,
        ShardedSGD,
        ShardedRMSprop,
        ShardedAdagrad,
        ShardedAdadelta,
        ShardedAdamax,
        ShardedNadam,
        ShardedFtrl,
        ShardedLion,
        ShardedLamb,
        ShardedAdafactor,
    )
}
"""Keras's class name -> the sharded optimizer that follows it."""
