"""shardadam: Keras 3's optimizers for PyTorch, with ZeRO-sharded optimizer state."""

from . import checkpoint, schedules
from .optimizer import ShardedOptimizer
from .optimizers import (
    FAMILY,
    ShardedAdam,
    ShardedAdamax,
    ShardedAdamW,
    ShardedFtrl,
    ShardedLion,
    ShardedNadam,
)

__version__ = "0.1.0"

__all__ = [
    "FAMILY",
    "ShardedAdam",
    "ShardedAdamW",
    "ShardedAdamax",
    "ShardedFtrl",
    "ShardedLion",
    "ShardedNadam",
    "ShardedOptimizer",
    "checkpoint",
    "schedules",
    "__version__",
]
