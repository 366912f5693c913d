"""Collectives on flat buffers; with no process group (world size 1) each is a no-op.

This module knows nothing of Adam: it moves flat tensors between ranks.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def default_group(process_group: object | None) -> object | None:
    """The group to shard over: the one given, else the default group if one is initialised."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def rank_and_world_size(group: object | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_sum_(tensor: Tensor, group: object | None) -> None:
    """Collective: sum ``tensor`` over the ranks of ``group``, in place."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def average_grads_(flat_grad: Tensor, group: object | None) -> None:
    """Collective: replace ``flat_grad`` by its mean over the ranks, as DDP averages."""
    if group is None or dist.get_world_size(group) == 1:
        return
    dist.all_reduce(flat_grad, op=dist.ReduceOp.SUM, group=group)
    flat_grad.div_(dist.get_world_size(group))


def gather_shards_(flat: Tensor, shard_numel: int, group: object | None) -> None:
    """Collective: every rank sends its shard of ``flat`` and receives all others, in place."""
    if group is None or dist.get_world_size(group) == 1:
        return
    rank = dist.get_rank(group)
    own = flat[rank * shard_numel : (rank + 1) * shard_numel].clone()
    # torch 2.13 renamed all_gather_into_tensor; older releases have only the old name.
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(flat, own, group=group)


def all_gather_objects(obj: object, group: object | None) -> list[object]:
    """Collective: every rank's ``obj``, in rank order (just ``[obj]`` without a group)."""
    if group is None or dist.get_world_size(group) == 1:
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def is_distributed(group: object | None) -> bool:
    return group is not None and dist.get_world_size(group) > 1
