"""Cases for test_robustness: the paths users take, run on 2 gloo ranks in one spawn.

Each case trains a small two-branch model whose branch ``b`` is unused on rank 1 (a parameter
without a gradient on one rank), and returns what the test compares with one process: the
same model trained on the mean of both ranks' losses (exactly the averaged gradient).
"""

from __future__ import annotations

import gc
import warnings

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from shardadam import ShardedAdafactor, ShardedAdam, ShardedLamb

TINY_BUCKETS = 0.0002  # MiB: several buckets
SETTINGS = [(2, comm) for comm in ("native", "all_reduce", "pairwise", "ring")] + [(1, "native")]
STEP_COLLECTIVES = {"Lamb": ShardedLamb, "Adafactor": ShardedAdafactor}
"""Members whose step() makes collectives of its own (per-tensor and row/column sums)."""
"""Stage 1 all-reduces gradients whatever the mode: one of its modes is enough."""


class TwoBranch(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(4, 6)
        self.shared = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 1)

    def forward(self, x: torch.Tensor, use_b: bool, reentrant: bool = False) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if use_b:
            h = h + torch.tanh(self.b(x))
        if reentrant:  # the shared layer twice, once inside reentrant checkpointing
            h = torch.utils.checkpoint.checkpoint(self.shared, h, use_reentrant=True)
        return self.head(torch.tanh(self.shared(h)))


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(1000 * step + rank))


def rank_loss(model: TwoBranch, rank: int, step: int, reentrant: bool = False) -> torch.Tensor:
    x = batch(rank, step).requires_grad_(reentrant)  # reentrant checkpointing needs it
    return model(x, use_b=rank == 0, reentrant=reentrant).pow(2).mean()


def one_process(
    steps: int, reentrant: bool = False, backwards: int = 1, cls: type = ShardedAdam, **kwargs
) -> list:
    """The reference: one process, the mean of both ranks' losses, ``backwards`` backward
    passes (gradients adding up in p.grad) per step."""
    model = TwoBranch()
    kwargs.setdefault("learning_rate", 0.05)
    opt = cls(model.named_parameters(), jit_compile=False, **kwargs)
    for step in range(steps):
        opt.zero_grad()
        for _ in range(backwards):
            loss = (rank_loss(model, 0, step, reentrant) + rank_loss(model, 1, step, reentrant)) / 2
            loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def build(
    stage: int = 2,
    comm: str = "pairwise",
    model: TwoBranch | None = None,
    cls: type = ShardedAdam,
    **kwargs,
):
    model = model or TwoBranch()
    kwargs.setdefault("learning_rate", 0.05)
    opt = cls(
        model.named_parameters(),
        jit_compile=False,
        stage=stage,
        comm=comm,
        bucket_cap_mb=TINY_BUCKETS,
        **kwargs,
    )
    return model, opt


def user_collective_between_backward_and_step(rank: int, world_size: int) -> dict:
    """A logging all_reduce after backward (branch b unused on rank 1) in every comm mode, and
    with the members whose step makes collectives of its own."""
    out = {}
    settings = [(stage, comm, "Adam") for stage, comm in SETTINGS]
    settings += [(2, "native", name) for name in STEP_COLLECTIVES]
    for stage, comm, member in settings:
        cls = STEP_COLLECTIVES.get(member, ShardedAdam)
        model, opt = build(stage, comm, cls=cls)
        logged = []
        for step in range(2):
            opt.zero_grad()
            loss = rank_loss(model, rank, step)
            loss.backward()
            value = loss.detach().clone()
            dist.all_reduce(value)  # what a logger does
            logged.append(float(value))
            opt.step()
        out[(stage, comm, member)] = {"params": params_of(model), "logged": logged}
    return out


def zero_grad_and_failing_step(rank: int, world_size: int) -> dict:
    """zero_grad() after a backward with a parameter unused on rank 1; a step that raises on
    both ranks, then on rank 1 only; each then retried after the fix."""
    out = {}
    model, opt = build()
    rank_loss(model, rank, 99).backward()  # dropped by zero_grad on every rank
    opt.zero_grad()
    for step in range(3):
        opt.zero_grad()
        rank_loss(model, rank, step).backward()
        if step == 1:
            opt.param_groups[0]["lr"] = -1.0
            try:
                opt.step()
            except ValueError as error:
                out["both"] = str(error)
            opt.param_groups[0]["lr"] = 0.05
        if step == 2:
            opt.param_groups[0]["lr"] = -1.0 if rank == 1 else 0.05
            try:
                opt.step()
            except (ValueError, RuntimeError) as error:
                out["one"] = f"{type(error).__name__}: {error}"
            opt.param_groups[0]["lr"] = 0.05
        opt.step()
    out["params"] = params_of(model)
    return out


def freeze_as_scheduled(model: TwoBranch, step: int) -> None:
    """Branch a frozen when the optimizer is built and unfrozen after one step; the head
    frozen after three (it then gets no gradient: no hang, not updated)."""
    model.a.requires_grad_(step >= 1)
    model.head.requires_grad_(step < 3)


def unfreezing(rank: int, world_size: int) -> dict:
    model = TwoBranch()
    freeze_as_scheduled(model, 0)
    model, opt = build(model=model)
    released = []
    for step in range(4):
        freeze_as_scheduled(model, step)
        opt.zero_grad()
        rank_loss(model, rank, step).backward()
        # Taken by a hook during backward (released), not left for step() to find.
        released.append(model.a.weight.grad is None)
        opt.step()
    return {"params": params_of(model), "released": released}


def several_gradients_per_backward(rank: int, world_size: int) -> dict:
    """Reentrant checkpointing of a shared layer; two backwards before one step; a dropped
    backward (opt.zero_grad) before the real one."""
    out = {}
    model, opt = build()
    for step in range(3):
        opt.zero_grad()
        rank_loss(model, rank, step, reentrant=True).backward()
        opt.step()
    out["reentrant"] = params_of(model)
    for stage in (1, 2):
        model, opt = build(stage)
        for step in range(3):
            opt.zero_grad()
            rank_loss(model, rank, step).backward()
            rank_loss(model, rank, step).backward()
            opt.step()
        out[f"twice{stage}"] = params_of(model)
    model, opt = build()
    kept = []
    for step in range(3):
        opt.zero_grad()
        with opt.no_sync():  # no communication: the gradient stays in p.grad
            rank_loss(model, rank, step).backward()
            kept.append(model.a.weight.grad is not None)
        rank_loss(model, rank, step).backward()
        opt.step()
    out["no_sync"] = params_of(model)
    out["no_sync_kept"] = kept
    model, opt = build()
    for step in range(3):
        rank_loss(model, rank, step + 50).backward()
        opt.zero_grad()  # drops what the hooks staged; model.zero_grad() could not
        rank_loss(model, rank, step).backward()
        opt.step()
    out["dropped"] = params_of(model)
    return out


def hooks_and_rebuilding(rank: int, world_size: int) -> dict:
    model = TwoBranch()
    counts = []
    for _ in range(3):  # a notebook re-running its cell
        model, opt = build(model=model)
        counts.append(len(model.a.weight._post_accumulate_grad_hooks))
    del opt
    gc.collect()
    counts.append(len(model.a.weight._post_accumulate_grad_hooks or {}))
    model, opt = build(model=TwoBranch())
    opt.close()
    counts.append(len(model.a.weight._post_accumulate_grad_hooks or {}))
    for step in range(2):  # closed: gradients stay in p.grad and are taken at step()
        opt.zero_grad()
        rank_loss(model, rank, step).backward()
        opt.step()
    return {"counts": counts, "params": params_of(model)}


def refusals(rank: int, world_size: int) -> dict:
    """Errors that must reach every rank (no hang)."""
    out = {}
    model, opt = build()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(rank_loss(model, rank, 0)).backward()
    try:
        scaler.step(opt)
    except RuntimeError as error:
        out["grad_scaler"] = str(error)
    opt.zero_grad()
    # A model converted on rank 1 only: every rank raises, none hangs.
    model, opt = build()
    if rank == 1:
        model.double()
    if rank == 0:
        rank_loss(model, rank, 0).backward()
    else:
        model(batch(rank, 0).double(), use_b=False).pow(2).mean().backward()
    try:
        opt.step()
    except RuntimeError as error:
        out["converted"] = str(error)
    # Ranks with different parameters: the error names the first extra one.
    extra = [torch.nn.Parameter(torch.zeros(3))] if rank == 1 else []
    try:
        ShardedAdam(list(TwoBranch().named_parameters()) + [("extra.w", p) for p in extra])
    except RuntimeError as error:
        out["extra"] = str(error)
    # No gradient anywhere: a no-op that warns, on every rank alike.
    model, opt = build()
    before = params_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    out["no_grads"] = {
        "warned": [str(w.message) for w in caught],
        "unchanged": all(torch.equal(p, q) for p, q in zip(before, params_of(model))),
        "iterations": opt.iterations,
    }
    return out


def accumulators(rank: int, world_size: int) -> dict:
    """Within an accumulation cycle ranks hold sums of different parameters (b is unused on
    rank 1): consolidated_state_dict reduces every one of them, without a hang."""
    model, opt = build(gradient_accumulation_steps=3)
    for step in range(2):
        opt.zero_grad()
        rank_loss(model, rank, step).backward()
        opt.step()
    consolidated = opt.consolidated_state_dict()
    if consolidated is None:
        return {}
    key = "Adam/gradient_accumulator"
    return {i: e[key] for i, e in consolidated["state"].items() if key in e}


def run_all(rank: int, world_size: int) -> dict:
    cases = [
        user_collective_between_backward_and_step,
        zero_grad_and_failing_step,
        unfreezing,
        several_gradients_per_backward,
        hooks_and_rebuilding,
        refusals,
        accumulators,
    ]
    return {case.__name__: case(rank, world_size) for case in cases}
