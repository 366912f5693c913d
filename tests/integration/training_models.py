"""Models for the app's resume, freezing and buffer tests, named by ``model._target_``; each
takes MLPClassifier's arguments, so ``model=mlp_classifier`` supplies them."""

from __future__ import annotations

import torch

from shardadam.models import MLPClassifier


class FrozenBackboneMLP(torch.nn.Module):
    """A pretrained-style backbone that is not trained, and a small trainable head."""

    def __init__(self, in_features: int, hidden: int, classes: int, depth: int) -> None:
        super().__init__()
        self.backbone = MLPClassifier(in_features, hidden, hidden, depth)
        self.backbone.requires_grad_(False)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x)))


class BatchNormMLP(torch.nn.Module):
    """Buffers that each rank updates from its own batches (BatchNorm's running statistics)."""

    def __init__(self, in_features: int, hidden: int, classes: int, depth: int) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(in_features, hidden)
        self.norm = torch.nn.BatchNorm1d(hidden)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.hidden(x))))
