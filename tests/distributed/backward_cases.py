"""Training through real backward passes, where hooks stage and reduce gradients."""

from __future__ import annotations

import torch

BACKWARD_CASES = {
    "stage2+native": {"sharding": {"stage": 2, "comm": "native"}},
    "stage2+pairwise": {"sharding": {"stage": 2, "comm": "pairwise"}},
    "stage2+pairwise+overlap": {
        "sharding": {"stage": 2, "comm": "pairwise", "overlap_param_gather": True}
    },
    "stage1+ring": {"sharding": {"stage": 1, "comm": "ring"}},
    "stage2+all_reduce+no_sync": {"sharding": {"stage": 2, "comm": "all_reduce"}, "no_sync": 3},
    "stage2+ring+accumulation": {
        "sharding": {"stage": 2, "comm": "ring"},
        "kwargs": {"gradient_accumulation_steps": 2},
    },
}
STEPS = 8
KWARGS = {"learning_rate": 0.05, "weight_decay": 0.1, "clipnorm": 1.0, "jit_compile": False}


class Net(torch.nn.Module):
    """Uneven layers, a frozen bias and a layer the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(6, 9)
        self.second = torch.nn.Linear(9, 5)
        self.head = torch.nn.Linear(5, 1)
        self.unused = torch.nn.Linear(3, 3)
        self.first.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def batch(rank: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)


def loss_of(model: Net, rank: int, step: int, micro: int = 0) -> torch.Tensor:
    x, y = batch(rank, step, micro)
    return torch.nn.functional.mse_loss(model(x), y)


def micro_batches(spec: dict) -> int:
    return spec.get("no_sync", 1)


def train_sharded(rank: int, spec: dict) -> dict:
    from shardadam import ShardedAdam

    model = Net()
    opt = ShardedAdam(
        model.named_parameters(),
        bucket_cap_mb=0.0002,
        **KWARGS,
        **spec.get("kwargs", {}),
        **spec["sharding"],
    )
    grads_after_backward = []
    held_after_backward = []  # memory_report()'s gradient buffers once backward returned
    for step in range(STEPS):
        n = micro_batches(spec)
        if n > 1:
            with opt.no_sync():
                for micro in range(n - 1):
                    loss_of(model, rank, step, micro).backward()
        loss_of(model, rank, step, n - 1).backward()
        grads_after_backward.append(model.second.weight.grad is not None)
        report = opt.memory_report()
        held_after_backward.append((report["full_grad_buffers"], report["comm_buffers"]))
        opt.step()
        opt.zero_grad()
    opt.wait_for_params()  # with overlap_param_gather, before reading them outside a forward
    second_backward_error = ""
    loss_of(model, rank, 0).backward()
    try:
        loss_of(model, rank, 1).backward()
    except RuntimeError as error:
        second_backward_error = str(error)
    opt.zero_grad()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    full_grad_bytes = opt.memory_report()["full_grad_buffers"]
    bucket_bytes = [b.flat_param.numel() * b.flat_param.element_size() for b in opt.buffers]

    # A fine-tuning script adds a group on every rank; an optimizer made anew over the same
    # model takes over its gradients from the discarded one.
    extra = torch.nn.Parameter(torch.ones(5))
    opt.add_param_group({"params": [("extra", extra)], "learning_rate": 0.5})
    (loss_of(model, rank, 2) + (extra * extra).sum()).backward()
    opt.step()
    opt.zero_grad()
    opt.wait_for_params()
    extra_after_step = extra.detach().clone()
    del opt
    fresh = ShardedAdam(model.named_parameters(), jit_compile=False, **spec["sharding"])
    before = model.head.weight.detach().clone()
    loss_of(model, rank, 3).backward()
    fresh.step()
    fresh.wait_for_params()
    return {
        "params": params,
        "extra_after_step": extra_after_step,
        "fresh_optimizer_moved": not torch.equal(before, model.head.weight.detach()),
        "grads_after_backward": grads_after_backward,
        "full_grad_bytes": full_grad_bytes,
        "held_after_backward": held_after_backward,
        "bucket_bytes": bucket_bytes,
        "second_backward_error": second_backward_error,
    }


def train_reference(world_size: int, spec: dict) -> dict:
    """One process: each step applies the rank-averaged gradients (no DDP, no sharding)."""
    from shardadam import ShardedAdam

    model = Net()
    opt = ShardedAdam(model.named_parameters(), **KWARGS, **spec.get("kwargs", {}))
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(STEPS):
        total = [torch.zeros_like(p) for p in params]
        used = [False] * len(params)
        for rank in range(world_size):
            model.zero_grad()
            for micro in range(micro_batches(spec)):
                loss_of(model, rank, step, micro).backward()
            for i, p in enumerate(params):
                if p.grad is not None:
                    total[i] += p.grad
                    used[i] = True
        for i, p in enumerate(params):
            p.grad = total[i] / world_size if used[i] else None
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}
