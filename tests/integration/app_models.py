"""Models for the training app's tests, named by ``model._target_``."""

from __future__ import annotations

import os

import torch


class RankDependentMLP(torch.nn.Module):
    """A model built differently on each rank: the app must refuse it on every rank."""

    def __init__(self, in_features: int, hidden: int, classes: int, depth: int) -> None:
        super().__init__()
        width = hidden + int(os.environ.get("RANK", "0"))  # (depth: as MLPClassifier's config)
        self.hidden = torch.nn.Linear(in_features, width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)))


# ---------------------------------------------------------------- models from outside the app
# Each is built from torch's global generator right after the app's torch.manual_seed(seed), so
# a test rebuilds the very same initial model to compute the expected first losses by formula.


class TupleTagger(torch.nn.Module):
    """Tags each token: returns a tuple ``(logits (B, T, classes), embeddings)``, the first
    element being the output, as many outside models do."""

    def __init__(self, vocab: int, classes: int) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, classes)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.embedding(tokens)
        return self.head(embedded), embedded


class DictRegressor(torch.nn.Module):
    """Takes dict samples as keyword arguments and returns a dict: ``logits`` (B,) and, given
    ``labels`` and ``own_loss``, its own ``loss``: the mean absolute error, which no data loss
    of the app computes (so a test can tell whose loss was used)."""

    def __init__(self, features: int, own_loss: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, 1)
        self.own_loss = own_loss

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        output = {"logits": self.linear(x).squeeze(-1)}
        if labels is not None and self.own_loss:
            output["loss"] = (output["logits"] - labels).abs().mean()
        return output


def padded_tags(n_train: int, n_eval: int, length: int, vocab: int, classes: int):
    """Token tagging with padding: each sample's tags end in a random number (0 to length - 1)
    of trainer.ignore_index=-100, so the ranks' shares of a batch count different numbers of
    tokens. Items are (tokens int64 (length,), tags int64 (length,))."""
    from torch.utils.data import TensorDataset

    from shardadam.datasets import Splits

    generator = torch.Generator().manual_seed(1)
    n = n_train + n_eval
    tokens = torch.randint(vocab, (n, length), generator=generator)
    tags = (tokens * 7 + 3) % classes
    kept = torch.randint(1, length + 1, (n, 1), generator=generator)
    tags[torch.arange(length).expand(n, length) >= kept] = -100
    return Splits(
        train=TensorDataset(tokens[:n_train], tags[:n_train]),
        eval=TensorDataset(tokens[n_train:], tags[n_train:]),
        loss="cross_entropy",
        items_per_sample=length,
    )


class _DictSamples(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


def regression(n_train: int, n_eval: int, features: int, dict_samples: bool):
    """y = x @ w + noise, as (x (features,), y ()) pairs or as dicts {"x", "labels"}."""
    from torch.utils.data import TensorDataset

    from shardadam.datasets import Splits

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n_train + n_eval, features, generator=generator)
    y = x @ torch.randn(features, generator=generator) + 0.1 * torch.randn(
        n_train + n_eval, generator=generator
    )
    kind = _DictSamples if dict_samples else TensorDataset
    return Splits(
        train=kind(x[:n_train], y[:n_train]), eval=kind(x[n_train:], y[n_train:]), loss="mse"
    )
