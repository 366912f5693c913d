"""Which samples each rank gets at each step, loaded through a ``torch.utils.data.DataLoader``.

A sample is a pair ``(input, target)``, given to the model as ``model(input)`` (or
``model(**input)`` where the input is a dict), or a dict holding ``labels``, given to the
model whole as keyword arguments (transformers' style) with ``labels`` as the target. The
DataLoader's default collate stacks either into a batch.

Note [batches from (seed, step)]
    Step s's global batch is a function of (trainer.seed, s) only: epoch e's order is a
    permutation of the training split drawn from a generator seeded with ``seed * 100003 +
    e``, step s takes the next ``batch_size`` samples of it (an epoch is ``len // batch_size``
    steps; the rest of the permutation is left out), and rank r takes the r-th contiguous
    ``batch_size / world_size`` of them. A run resumed at step s so sees the batches the
    uninterrupted one would, at any world size, and the loaders draw nothing from torch's
    global generator (which a checkpoint restores for dropout and the like).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["Batch", "StepBatchSampler", "TrainBatches", "eval_batches", "forward", "global_batch"]


def global_batch(step: int, train_numel: int, batch_size: int, seed: int) -> Tensor:
    """The indices of step ``step``'s global batch (Note [batches from (seed, step)])."""
    return _EpochOrder(train_numel, batch_size, seed).global_batch(step)


class _EpochOrder:
    """The training split's order, one permutation per epoch (kept for the epoch's steps)."""

    def __init__(self, train_numel: int, batch_size: int, seed: int) -> None:
        self.train_numel, self.batch_size, self.seed = train_numel, batch_size, seed
        self.steps_per_epoch = max(1, train_numel // batch_size)
        self._order: tuple[int, Tensor | None] = (-1, None)

    def global_batch(self, step: int) -> Tensor:
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._order = (epoch, torch.randperm(self.train_numel, generator=generator))
        return self._order[1][index * self.batch_size : (index + 1) * self.batch_size]


class StepBatchSampler(Sampler[list[int]]):
    """This rank's indices for each step from ``first_step`` to ``last_step``, one list a step
    (Note [batches from (seed, step)])."""

    def __init__(
        self,
        train_numel: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        first_step: int,
        last_step: int,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"Invalid batch_size: {batch_size} does not split evenly over {world_size} "
                f"ranks (use a multiple of {world_size})"
            )
        self.order = _EpochOrder(train_numel, batch_size, seed)
        self.per_rank = batch_size // world_size
        self.rank, self.first_step, self.last_step = rank, first_step, last_step

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step + 1)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.rank * self.per_rank
        for step in range(self.first_step, self.last_step + 1):
            yield self.order.global_batch(step)[start : start + self.per_rank].tolist()


def _rank_slice(numel: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous share of ``range(numel)`` (sizes differ by at most one)."""
    return range(rank * numel // world_size, (rank + 1) * numel // world_size)


@dataclass(frozen=True)
class Batch:
    """One rank's batch, collated and on its device."""

    inputs: Any
    """What the model is given: a tensor (``model(inputs)``) or a dict (``model(**inputs)``)."""
    targets: Tensor
    """What the loss compares the output with (``labels`` for dict samples)."""
    labels_given: bool
    """Whether ``inputs`` holds the targets as ``labels`` (so the model may compute its loss)."""
    samples: int


def split_batch(collated: Any) -> Batch:
    """A default-collated batch of samples (pairs or dicts with ``labels``) as a Batch."""
    if isinstance(collated, Mapping):
        if "labels" not in collated:
            raise TypeError(
                f"a dict sample must hold 'labels' (the target); these hold {list(collated)}"
            )
        inputs, targets = dict(collated), collated["labels"]
    elif isinstance(collated, (tuple, list)) and len(collated) == 2:
        inputs, targets = collated
    else:
        raise TypeError(
            f"a batch collated into a {type(collated).__name__}; a sample is (input, target) "
            "or a dict holding 'labels'"
        )
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"the batch's targets are a {type(targets).__name__}; a sample's target (or its "
            "'labels') must be a tensor or a number"
        )
    labels_given = isinstance(inputs, Mapping) and "labels" in inputs
    return Batch(inputs, targets, labels_given, samples=len(targets))


def forward(model: torch.nn.Module, batch: Batch) -> Any:
    """The model's output for the batch: ``model(**inputs)`` for a dict, else ``model(inputs)``."""
    if isinstance(batch.inputs, Mapping):
        return model(**batch.inputs)
    return model(batch.inputs)


def to_device(value: Any, device: torch.device) -> Any:
    """``value``'s tensors moved to ``device``, inside dicts, tuples and lists too."""
    if isinstance(value, Tensor):
        # From pinned memory (a CUDA device) the copy overlaps; on a CPU it is no copy at all.
        return value.to(device, non_blocking=device.type == "cuda")
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    return value


def _loader(
    dataset: Dataset, batch_sampler: Sampler, num_workers: int, device: torch.device
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # Its own generator (for the workers' seeds), so as to leave torch's global one alone.
        generator=torch.Generator().manual_seed(0),
    )


class TrainBatches:
    """This rank's training batches, step by step, from one DataLoader over the run's steps.

    ``at(step)`` expects the steps in order; another step (a start, a resume) starts a new
    DataLoader there, which gives what the old one would have (Note [batches from (seed, step)]).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        last_step: int,
        num_workers: int,
        device: torch.device,
    ) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.last_step = rank, world_size, last_step
        self.num_workers, self.device = num_workers, device
        self._next: tuple[int, Iterator[Any] | None] = (0, None)

    def at(self, step: int) -> Batch:
        next_step, batches = self._next
        if batches is None or next_step != step:
            sampler = StepBatchSampler(
                len(self.dataset), self.batch_size, self.seed, self.rank, self.world_size,
                first_step=step, last_step=max(step, self.last_step),
            )  # fmt: skip
            batches = iter(_loader(self.dataset, sampler, self.num_workers, self.device))
        self._next = (step + 1, batches)
        return split_batch(to_device(next(batches), self.device))


class _EvalBatchSampler(Sampler[list[int]]):
    """This rank's contiguous share of ``range(numel)``, in lists of ``per_rank`` indices."""

    def __init__(self, numel: int, per_rank: int, rank: int, world_size: int) -> None:
        self.mine, self.per_rank = _rank_slice(numel, rank, world_size), per_rank

    def __len__(self) -> int:
        return -(-len(self.mine) // self.per_rank)

    def __iter__(self) -> Iterator[list[int]]:
        for first in range(0, len(self.mine), self.per_rank):
            yield list(self.mine[first : first + self.per_rank])


def eval_batches(
    dataset: Dataset,
    numel: int,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    device: torch.device,
) -> Iterator[Batch]:
    """This rank's batches of the first ``numel`` samples of ``dataset``: its contiguous share,
    ``batch_size / world_size`` (at least 1) samples a batch."""
    per_rank = max(1, batch_size // world_size)
    sampler = _EvalBatchSampler(min(numel, len(dataset)), per_rank, rank, world_size)
    for collated in _loader(dataset, sampler, num_workers, device):
        yield split_batch(to_device(collated, device))
