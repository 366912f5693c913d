"""The optimizer state of a rank's shards, and the names it carries in state dicts."""

from __future__ import annotations

import dataclasses

from torch import Tensor

# Names of the per-parameter state entries (after the "<name>/" prefix), as Keras names them.
MOMENTUM, VELOCITY, VELOCITY_HAT = "momentum", "velocity", "velocity_hat"
AVERAGE, MASTER, ACCUMULATOR = "average", "master", "gradient_accumulator"
OWNED_RANGE = "owned_range"
SHARDED_KINDS = (MOMENTUM, VELOCITY, VELOCITY_HAT, AVERAGE, MASTER)
"""The state kept for the owned shard only; the accumulator holds this rank's whole sums."""


@dataclasses.dataclass
class ShardState:
    """The optimizer state of one buffer's owned shard, in the compute dtype."""

    exp_avg: Tensor
    exp_avg_sq: Tensor
    exp_avg_sq_max: Tensor | None = None
    ema: Tensor | None = None
    master: Tensor | None = None
    """fp32 copy of a low-precision shard; the update runs on it."""

    def entries(self) -> dict[str, Tensor]:
        named = {
            MOMENTUM: self.exp_avg,
            VELOCITY: self.exp_avg_sq,
            VELOCITY_HAT: self.exp_avg_sq_max,
            AVERAGE: self.ema,
            MASTER: self.master,
        }
        return {k: v for k, v in named.items() if v is not None}
