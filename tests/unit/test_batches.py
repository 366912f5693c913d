"""Batches through a DataLoader (shardadam.batches): a function of (seed, step) only, the ranks'
shares of it, a resumed start, dict samples, evaluation shares, and torch's generator left
alone."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from shardadam.app_config import TrainerConfig
from shardadam.batches import (
    StepBatchSampler,
    TrainBatches,
    eval_batches,
    forward,
    global_batch,
    split_batch,
)

CPU = torch.device("cpu")


def expected_global_batch(step: int, numel: int, batch_size: int, seed: int) -> list[int]:
    """The formula: epoch e's permutation, drawn from seed * 100003 + e, cut in batches."""
    steps_per_epoch = max(1, numel // batch_size)
    epoch, index = divmod(step - 1, steps_per_epoch)
    order = torch.randperm(numel, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[index * batch_size : (index + 1) * batch_size].tolist()


def test_ranks_shares_make_the_global_batch_of_each_step_over_epochs():
    numel, batch_size, seed = 23, 6, 5  # 3 steps an epoch, 5 samples left out of each
    for world_size in (1, 2, 3):
        samplers = [StepBatchSampler(numel, batch_size, seed, rank, world_size, 1, 8)
                    for rank in range(world_size)]  # fmt: skip
        per_step = list(zip(*samplers))
        assert len(per_step) == len(samplers[0]) == 8
        for step, shares in enumerate(per_step, start=1):
            assert [len(share) for share in shares] == [batch_size // world_size] * world_size
            joined = [i for share in shares for i in share]
            assert joined == expected_global_batch(step, numel, batch_size, seed)
            assert global_batch(step, numel, batch_size, seed).tolist() == joined
    # Within an epoch no sample repeats.
    first_epoch = [i for step in (1, 2, 3) for i in expected_global_batch(step, 23, 6, 5)]
    assert len(set(first_epoch)) == 18


def test_a_sampler_that_starts_at_a_step_gives_what_the_whole_run_would():
    whole = list(StepBatchSampler(50, 8, 3, rank=1, world_size=2, first_step=1, last_step=20))
    resumed = list(StepBatchSampler(50, 8, 3, rank=1, world_size=2, first_step=13, last_step=20))
    assert resumed == whole[12:]


class Numbered(Dataset):
    """Item i is (tensor([i, i]) as float, tensor(i)): a batch shows which samples it holds."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int):
        return torch.tensor([index, index], dtype=torch.float32), torch.tensor(index)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_batches_load_the_steps_samples_and_restart_anywhere(num_workers):
    batches = TrainBatches(Numbered(), 8, 1, rank=1, world_size=2, last_step=12,
                           num_workers=num_workers, device=CPU)  # fmt: skip
    state = torch.get_rng_state()
    seen = {step: batches.at(step) for step in (1, 2, 3, 9, 10)}  # 9: a restart, as a resume
    assert torch.equal(torch.get_rng_state(), state)  # dropout's generator is left alone
    for step, batch in seen.items():
        mine = expected_global_batch(step, 40, 8, 1)[4:]
        assert batch.targets.tolist() == mine and batch.samples == 4
        assert batch.inputs.tolist() == [[float(i)] * 2 for i in mine]
        assert not batch.labels_given


class DictSamples(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int):
        ids = torch.arange(3) + index
        return {"input_ids": ids, "attention_mask": torch.ones(3), "labels": ids}


def test_dict_samples_are_collated_and_given_to_the_model_as_keyword_arguments():
    batches = list(eval_batches(DictSamples(), 10, 4, rank=0, world_size=1, num_workers=0,
                                device=CPU))  # fmt: skip
    assert [b.samples for b in batches] == [4, 4, 2]
    batch = batches[0]
    assert batch.labels_given and set(batch.inputs) == {"input_ids", "attention_mask", "labels"}
    assert batch.targets is batch.inputs["labels"] and batch.targets.shape == (4, 3)

    class Echo(torch.nn.Module):
        def forward(self, input_ids, attention_mask, labels):
            return input_ids, attention_mask, labels

    ids = torch.stack([torch.arange(3) + i for i in range(4)])
    for given, expected in zip(forward(Echo(), batch), (ids, torch.ones(4, 3), ids)):
        assert torch.equal(given, expected)
    pair = split_batch([{"x": torch.zeros(2), "labels": torch.ones(2)}, torch.ones(2)])
    assert pair.labels_given and pair.targets.tolist() == [1.0, 1.0]
    with pytest.raises(TypeError, match=r"a dict sample must hold 'labels'.*\['input_ids'\]"):
        split_batch({"input_ids": torch.zeros(2)})
    with pytest.raises(TypeError, match="a batch collated into a Tensor"):
        split_batch(torch.zeros(2))


def test_evaluation_shares_cover_the_first_samples_once_over_ranks():
    dataset = TensorDataset(torch.arange(30).float(), torch.arange(30))
    for world_size, numel, batch_size in ((1, 30, 8), (2, 13, 4), (3, 7, 3), (4, 2, 4)):
        seen = []
        for rank in range(world_size):
            batches = list(eval_batches(dataset, numel, batch_size, rank, world_size, 0, CPU))
            assert all(b.samples <= max(1, batch_size // world_size) for b in batches)
            seen += [i for b in batches for i in b.targets.tolist()]
        assert seen == list(range(numel))  # contiguous shares in rank order
    assert len(list(eval_batches(dataset, 100, 8, 0, 1, 0, CPU))) == 4  # at most the split


def test_num_workers_is_checked():
    with pytest.raises(ValueError, match=r"Invalid trainer.num_workers: -1 \(expected an int"):
        TrainerConfig(num_workers=-1)
    with pytest.raises(ValueError, match="Invalid batch_size: 6 does not split evenly over 4"):
        StepBatchSampler(10, 6, 0, 0, 4, 1, 2)
