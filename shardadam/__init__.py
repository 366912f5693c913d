"""shardadam: Keras 3's Adam for PyTorch, with ZeRO-sharded optimizer state."""

from . import checkpoint, schedules
from .optimizer import ShardedOptimizer
from .optimizers import ShardedAdam

__version__ = "0.1.0"

__all__ = ["ShardedAdam", "ShardedOptimizer", "checkpoint", "schedules", "__version__"]
