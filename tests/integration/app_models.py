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
