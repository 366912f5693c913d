"""Keeping the model the same on every rank where no DDP does it: the same initial weights,
and rank 0's buffers (Note [buffers across ranks])."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .bootstrap import DistributedContext

# Note [buffers across ranks]
#     The optimizer keeps the parameters equal on every rank; nothing keeps the buffers equal.
#     BatchNorm's running statistics are updated from each rank's own batches, so after a few
#     steps every rank holds different ones, and an evaluation or a saved model would match no
#     rank. As DDP's broadcast_buffers does, rank 0's buffers are broadcast: always before each
#     evaluation and each save, and before every training forward if
#     distributed.broadcast_buffers (DDP's default; costs one broadcast per dtype per step).


def check_same_weights(model: torch.nn.Module, ctx: DistributedContext) -> None:
    """Collective: every rank must start from rank 0's weights (ShardedAdam has already
    checked names and shapes)."""
    if ctx.world_size == 1:
        return
    with torch.no_grad():
        total = sum(t.double().sum() for t in model.state_dict().values() if t.is_floating_point())
        mine = torch.as_tensor(total, dtype=torch.float64, device=ctx.device).reshape(1)
    everyone = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    differing = [r for r, t in enumerate(everyone) if not torch.equal(t, everyone[0])]
    if differing:
        raise RuntimeError(
            f"rank {ctx.rank}/{ctx.world_size}: the model's initial weights differ between "
            f"rank 0 and ranks {differing}; build the model deterministically (the app seeds "
            "torch with trainer.seed just before building it)"
        )


@torch.no_grad()
def broadcast_buffers(model: torch.nn.Module, ctx: DistributedContext) -> None:
    """Collective: every rank's buffers become rank 0's (Note [buffers across ranks]); one
    broadcast per dtype."""
    if ctx.world_size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in {id(b): b for b in model.buffers()}.values():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        buffers = by_dtype[dtype]
        flat = torch.cat([b.detach().reshape(-1) for b in buffers]).to(ctx.device)
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()
