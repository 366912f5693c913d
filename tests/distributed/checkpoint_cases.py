"""Training runs that save a checkpoint at one world size and continue at another.

Every step trains on one global batch, cut evenly across the ranks, so the averaged gradient
(and so the run) is the same at every world size up to the order of float additions.
"""

from __future__ import annotations

from pathlib import Path

import torch

GLOBAL_BATCH = 12  # divides evenly at world sizes 1, 2, 3 and 4
CONFIGS = {
    # Saved at an update boundary: groups with their own overrides, AMSGrad, EMA, exclusions.
    "groups+amsgrad+ema": {"kwargs": {"use_ema": True, "clipnorm": 1.0}, "saved_at": 4},
    # Saved in the middle of an accumulation cycle (5 micro-steps of 2).
    "accumulation+global_clip": {
        "kwargs": {"gradient_accumulation_steps": 2, "global_clipnorm": 0.5},
        "saved_at": 5,
    },
    # bf16 parameters: the fp32 master weights are checkpointed and resharded. Gradients are
    # reduced in bf16, so runs at different world sizes differ by bf16 roundings.
    "bf16+ema": {
        "kwargs": {"use_ema": True},
        "saved_at": 3,
        "dtype": torch.bfloat16,
        "same_world_size_only": True,
    },
}
MORE_STEPS = 3
RESHARDINGS = {
    "same": {},
    "tiny_buckets+stage1": {"bucket_cap_mb": 0.0005, "stage": 1},
}


class Model(torch.nn.Module):
    """Uneven shapes (tensors cut by shard boundaries) and a buffer that is not a parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("input_scale", torch.linspace(0.5, 1.5, 6))
        self.embed = torch.nn.Linear(6, 11)
        self.norm = torch.nn.LayerNorm(11)
        self.head = torch.nn.Linear(11, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.embed(x * self.input_scale))))


def make(config: str, sharding: dict | None = None):
    from shardadam import ShardedAdam, schedules

    spec = CONFIGS[config]
    model = Model().to(spec.get("dtype", torch.float32))
    body = [p for n, p in model.named_parameters() if not n.startswith("head")]
    opt = ShardedAdam(
        [
            {"params": body},
            {"params": model.head.parameters(), "beta_1": 0.8, "amsgrad": True},
        ],
        learning_rate=schedules.CosineDecay(0.05, decay_steps=20),
        weight_decay=0.1,
        jit_compile=False,
        **spec["kwargs"],
        **(sharding or {}),
    )
    opt.exclude_from_weight_decay(var_list=[model.embed.bias, model.head.bias])
    return model, opt


def train(model, opt, rank: int, world_size: int, start: int, count: int) -> None:
    dtype = next(model.parameters()).dtype
    per_rank = GLOBAL_BATCH // world_size
    for step in range(start, start + count):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(GLOBAL_BATCH, 6, generator=gen)[rank * per_rank : (rank + 1) * per_rank]
        y = torch.randn(GLOBAL_BATCH, 3, generator=gen)[rank * per_rank : (rank + 1) * per_rank]
        loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()  # averaged over ranks: the global batch's mean
        opt.step()
        opt.zero_grad()


def snapshot(model, opt) -> dict | None:
    """Collective: the full model and optimizer state (on rank 0; None elsewhere)."""
    state = opt.consolidated_state_dict(to_rank=0)
    if state is None:
        return None
    model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # In one process the state_dict holds views of the live state: copy.
    optimizer_state = {
        i: {k: v.clone() for k, v in entry.items()} for i, entry in state["state"].items()
    }
    return {"model": model_state, "optimizer": optimizer_state, "iterations": opt.iterations}


def save_then_continue(rank: int, world_size: int, root: str) -> dict:
    """Train, save, and keep going: the uninterrupted runs."""
    from shardadam import checkpoint

    results = {}
    for config, spec in CONFIGS.items():
        model, opt = make(config)
        train(model, opt, rank, world_size, 0, spec["saved_at"])
        saved = snapshot(model, opt)
        checkpoint.save(Path(root) / config, model=model, optimizer=opt, step=spec["saved_at"])
        train(model, opt, rank, world_size, spec["saved_at"], MORE_STEPS)
        results[config] = {"saved": saved, "final": snapshot(model, opt)}
    return results


def load_then_continue(rank: int, world_size: int, root: str, sharding: dict) -> dict:
    """Fresh model and optimizer (other weights: another seed), load, continue."""
    from shardadam import checkpoint

    results = {}
    for config, spec in CONFIGS.items():
        torch.manual_seed(123)
        model, opt = make(config, sharding)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.add_(1.0)  # anything but the saved values
        info = checkpoint.load(Path(root) / config, model=model, optimizer=opt)
        loaded = snapshot(model, opt)
        train(model, opt, rank, world_size, spec["saved_at"], MORE_STEPS)
        results[config] = {"step": info.step, "loaded": loaded, "final": snapshot(model, opt)}
    return results


def load_corrupt_on_one_rank(rank: int, world_size: int, root: str) -> dict:
    """A byte flipped in the last record of rank 1's file (its own optimizer shard), which only
    rank 1 reads back: every rank must refuse, and none may change anything."""
    import shutil

    import torch.distributed as dist

    from shardadam import checkpoint

    config = next(iter(CONFIGS))
    corrupt = Path(root) / "corrupt"
    if rank == 0:
        shutil.copytree(checkpoint.latest(Path(root) / config), corrupt / "step-00000004")
        data = corrupt / "step-00000004" / "rank-00001.bin"
        raw = bytearray(data.read_bytes())
        raw[-3] ^= 0x01
        data.write_bytes(bytes(raw))
    dist.barrier()
    model, opt = make(config)
    before = snapshot(model, opt)
    try:
        checkpoint.load(corrupt, model=model, optimizer=opt)
        error = None
    except checkpoint.CheckpointError as refused:
        error = str(refused)
    return {"error": error, "before": before, "after": snapshot(model, opt)}


class NormModel(torch.nn.Module):
    """BatchNorm: running statistics that each rank updates from its own batches (nothing
    synchronises buffers), and a frozen parameter the optimizer does not update."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(6, 5)
        self.norm = torch.nn.BatchNorm1d(5)
        self.head = torch.nn.Linear(5, 3)
        self.head.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)))


def save_and_load_per_rank_buffers(rank: int, world_size: int, root: str) -> dict:
    """Save on ranks whose buffers differ, with and without an optimizer, and load into fresh
    models: every rank should get rank 0's buffers, whole."""
    from shardadam import ShardedAdam, checkpoint

    def make_norm_model():
        model = NormModel()
        params = [p for p in model.parameters() if p.requires_grad]
        return model, ShardedAdam(params, jit_compile=False)

    model, opt = make_norm_model()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(rank))  # this rank's batch
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        model.norm.num_batches_tracked.fill_(10 + rank)
        model.head.bias.fill_(float(rank))  # frozen, and different on each rank
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    root = Path(root) / "per-rank-buffers"
    checkpoint.save(root / "with-optimizer", model=model, optimizer=opt, step=1)
    checkpoint.save(root / "model-only", model=model, step=1)
    loaded = {}
    for kind in ("with-optimizer", "model-only"):
        fresh, fresh_opt = make_norm_model()
        with torch.no_grad():
            for tensor in fresh.state_dict().values():
                tensor.add_(100)
        if kind == "with-optimizer":
            checkpoint.load(root / kind, model=fresh, optimizer=fresh_opt)
        else:
            checkpoint.load(root / kind, model=fresh)
        loaded[kind] = {k: v.detach().clone() for k, v in fresh.state_dict().items()}
    return {"saved": saved, "loaded": loaded}


EXPORTED = ("groups+amsgrad+ema", "bf16+ema")


def save_for_export(rank: int, world_size: int, root: str) -> dict:
    """Train with an EMA (fp32, and bf16 with fp32 masters) and save; the weights, the EMA
    swapped in, and each parameter's moving_average(), to compare an export with."""
    from shardadam import checkpoint
    from shardadam.export import plain_state_dict

    results = {}
    for config in EXPORTED:
        model, opt = make(config)
        train(model, opt, rank, world_size, 0, CONFIGS[config]["saved_at"])
        checkpoint.save(Path(root) / "export" / config, model=model, optimizer=opt)
        with opt.swap_moving_averages():
            swapped = plain_state_dict(model)
        averages = {name: opt.moving_average(p) for name, p in model.named_parameters()}
        results[config] = {"weights": plain_state_dict(model), "ema": swapped, "averages": averages}
    return results
