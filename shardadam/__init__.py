"""shardadam: Keras 3's Adam for PyTorch, with ZeRO-sharded optimizer state."""

from . import schedules
from .optimizer import ShardedAdam

__version__ = "0.1.0"

__all__ = ["ShardedAdam", "schedules", "__version__"]
