"""Example datasets that the training app builds from its config by ``_target_``.

A data factory takes keyword arguments and returns :class:`Splits`: a train and an eval
map-style dataset whose items are ``(input, target)`` pairs or dicts holding ``labels``
(transformers' style, given to the model as keyword arguments; see :mod:`shardadam.batches`),
the name of the loss, and how many items (tokens) one sample holds. Any importable factory
that returns a ``Splits`` works the same way; the two here pair with :mod:`shardadam.models`:

- :func:`text_corpus`: byte-level language modelling (vocabulary = the 256 byte values, so no
  tokenizer) on ``shardadam/data/corpus.txt`` or a file of your own, for ``TinyTransformerLM``.
- :func:`teacher_classification`: inputs labelled by a fixed random teacher network, built
  offline from a seed, for ``MLPClassifier``.

``corpus.txt`` is about 50 KB of plain ASCII English prose (short pieces on weather, cooking,
travel, gardening, machines, rivers, cities and the like), written for this project and
distributed under the project's license.
"""

from __future__ import annotations

import importlib.resources
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from .config import check_positive_int
from .losses import LOSSES

__all__ = ["ByteBlocks", "Splits", "check_splits", "teacher_classification", "text_corpus"]


@dataclass(frozen=True)
class Splits:
    """What a data factory returns to the training app."""

    train: Dataset
    """Map-style; item i is a pair ``(input, target)`` or a dict holding ``labels``, of tensors
    the DataLoader's default collate can stack (the same shapes for all i)."""
    eval: Dataset
    """Held-out data, items shaped like train's."""
    loss: str
    """``"cross_entropy"``: model output (..., C) logits against int64 targets (...), both
    flattened over the leading dimensions (targets equal to trainer.ignore_index count for
    nothing); ``"mse"``: output shaped like the target. See :mod:`shardadam.losses`."""
    items_per_sample: int = 1
    """What one sample counts for in a throughput metric: tokens for a language model."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"Invalid loss: {self.loss!r} (expected one of {LOSSES})")
        check_positive_int(self.items_per_sample, "items_per_sample", minimum=1, optional=False)


def check_splits(data: Any) -> None:
    """Refuse what a data factory built unless it keeps the :class:`Splits` contract, with
    its first samples in one of the two forms."""
    missing = [a for a in ("train", "eval", "loss", "items_per_sample") if not hasattr(data, a)]
    if missing:
        raise TypeError(
            f"data._target_ built a {type(data).__name__} without {missing}; a data factory "
            "returns shardadam.datasets.Splits (train, eval, loss, items_per_sample)"
        )
    # data.loss is checked where it is used: shardadam.losses.TrainingLoss.
    if len(data.train) == 0 or len(data.eval) == 0:
        raise ValueError("the data's train and eval splits must not be empty")
    for name in ("train", "eval"):
        sample = getattr(data, name)[0]
        if isinstance(sample, Mapping):
            if "labels" not in sample:
                raise ValueError(
                    f"data.{name}[0] is a dict with keys {list(sample)} but no 'labels': a dict "
                    "sample is given to the model as keyword arguments and needs its target "
                    "as 'labels'"
                )
        elif not (isinstance(sample, (tuple, list)) and len(sample) == 2):
            kind = f"a {len(sample)}-tuple" if isinstance(sample, tuple) else type(sample).__name__
            raise TypeError(
                f"data.{name}[0] is {kind}; a sample is a pair (input, target) or a dict "
                "holding 'labels'"
            )


class ByteBlocks(Dataset):
    """Windows over a byte string for next-byte prediction.

    Item i is ``(data[s : s + block_size], data[s + 1 : s + block_size + 1])`` as int64, with
    ``s = i * stride``; the last window is the last that fits whole.
    """

    def __init__(self, data: Tensor, block_size: int, stride: int) -> None:
        self.data = data
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        windows_after_first = (self.data.numel() - self.block_size - 1) // self.stride
        return max(0, windows_after_first + 1)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} blocks")
        start = (index % len(self)) * self.stride
        window = self.data[start : start + self.block_size + 1].long()
        return window[:-1], window[1:]


def text_corpus(
    block_size: int = 64, eval_fraction: float = 0.1, path: str | None = None
) -> Splits:
    """Byte-level language modelling on the embedded corpus, or on the file at ``path``.

    The first ``1 - eval_fraction`` of the bytes train and the rest evaluate, so no eval
    window overlaps a train window. Train windows start every ``block_size // 2`` bytes (half
    overlapping, twice the samples from a small text); eval windows every ``block_size`` bytes
    (each eval byte is predicted once).
    """
    check_positive_int(block_size, "block_size", minimum=2, optional=False)
    _check_eval_fraction(eval_fraction)
    data, source = _read_bytes(path)
    n_train = round(data.numel() * (1 - eval_fraction))
    splits = {"train": data[:n_train], "eval": data[n_train:]}
    for name, part in splits.items():
        if part.numel() < block_size + 1:
            raise ValueError(
                f"Text too short: {source} has {data.numel()} bytes, so the {name} split gets "
                f"{part.numel()} but one block needs block_size + 1 = {block_size + 1} "
                f"(eval_fraction={eval_fraction}); use a smaller block_size, another "
                "eval_fraction or a longer text"
            )
    return Splits(
        train=ByteBlocks(splits["train"], block_size, stride=block_size // 2),
        eval=ByteBlocks(splits["eval"], block_size, stride=block_size),
        loss="cross_entropy",
        items_per_sample=block_size,
    )


def _check_eval_fraction(eval_fraction: float) -> None:
    is_real = isinstance(eval_fraction, numbers.Real) and not isinstance(eval_fraction, bool)
    if not is_real:
        raise TypeError(f"Invalid eval_fraction: {eval_fraction!r} (expected a float)")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"Invalid eval_fraction: {eval_fraction} (expected 0 < eval_fraction < 1)")


def _read_bytes(path: str | None) -> tuple[Tensor, str]:
    """The text as a uint8 tensor, and a name for it in error messages."""
    if path is None:
        # importlib.resources, not __file__, so that it also reads from a wheel or zip.
        resource = importlib.resources.files("shardadam") / "data" / "corpus.txt"
        raw, source = resource.read_bytes(), "the embedded corpus"
    else:
        if not Path(path).is_file():
            raise ValueError(f"Invalid path: {path!r} (expected a readable file)")
        raw, source = Path(path).read_bytes(), repr(path)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8), source


def teacher_classification(
    n_train: int = 4096, n_eval: int = 1024, in_features: int = 16, classes: int = 4, seed: int = 0
) -> Splits:
    """Gaussian inputs labelled by the argmax of a fixed random MLP ("teacher").

    The labels are a deterministic function of the inputs, so a student can learn them (up to
    its capacity); everything is drawn from a ``torch.Generator`` seeded with ``seed``, so the
    same arguments give the same data on every rank and every run. Items are
    ``(x float32 (in_features,), label int64 ())``.
    """
    for name, value, minimum in (
        ("n_train", n_train, 1),
        ("n_eval", n_eval, 1),
        ("in_features", in_features, 1),
        ("classes", classes, 2),
        ("seed", seed, 0),
    ):
        check_positive_int(value, name, minimum=minimum, optional=False)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n_train + n_eval, in_features, generator=generator)
    labels = _teacher_labels(inputs, classes, generator)
    return Splits(
        train=TensorDataset(inputs[:n_train], labels[:n_train]),
        eval=TensorDataset(inputs[n_train:], labels[n_train:]),
        loss="cross_entropy",
        items_per_sample=1,
    )


def _teacher_labels(inputs: Tensor, classes: int, generator: torch.Generator) -> Tensor:
    hidden = 32
    in_features = inputs.shape[1]
    w_hidden = torch.randn(in_features, hidden, generator=generator) / math.sqrt(in_features)
    w_out = torch.randn(hidden, classes, generator=generator) / math.sqrt(hidden)
    # No biases: the teacher is an odd function of symmetric inputs, so the classes come out
    # roughly balanced rather than one of them taking most of the labels.
    return (torch.tanh(inputs @ w_hidden) @ w_out).argmax(dim=1)
