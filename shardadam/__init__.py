"""shardadam: Keras 3's optimizers for PyTorch, with ZeRO-sharded optimizer state."""

from . import checkpoint, schedules
from .optimizer import ShardedOptimizer
from .optimizers import (
    FAMILY,
    ShardedAdadelta,
    ShardedAdafactor,
    ShardedAdagrad,
    ShardedAdam,
    ShardedAdamax,
    ShardedAdamW,
    ShardedFtrl,
    ShardedLamb,
    ShardedLion,
    ShardedNadam,
    ShardedRMSprop,
    ShardedSGD,
)

__version__ = "0.1.0"

__all__ = [
    "FAMILY",
    "ShardedAdadelta",
    "ShardedAdagrad",
    "ShardedAdam",
    "ShardedAdamW",
    "ShardedAdamax",
    "ShardedFtrl",
    "ShardedLamb",
    "ShardedAdafactor",
    "ShardedLion",
    "ShardedNadam",
    "ShardedOptimizer",
    "ShardedRMSprop",
    "ShardedSGD",
    "checkpoint",
    "schedules",
    "__version__",
]
