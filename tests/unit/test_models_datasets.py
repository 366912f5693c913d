"""The example models and datasets keep the contract the training app relies on."""

from __future__ import annotations

import importlib.resources

import pytest
import torch
from torch.nn import functional as F

from shardadam.datasets import Splits, check_splits, teacher_classification, text_corpus
from shardadam.models import MLPClassifier, TinyTransformerLM


def stack(dataset, indices):
    """Batch items as the app's DataLoader (its default collate) does: stacked."""
    inputs, targets = zip(*(dataset[i] for i in indices))
    return torch.stack(inputs), torch.stack(targets)


def test_corpus_is_ascii_prose_of_at_least_40_kb():
    raw = (importlib.resources.files("shardadam") / "data" / "corpus.txt").read_bytes()
    assert len(raw) >= 40_000
    raw.decode("ascii")  # raises on any non-ASCII byte


def test_text_corpus_items_and_split_sizes():
    splits = text_corpus(block_size=32, eval_fraction=0.1)
    assert isinstance(splits, Splits)
    assert (splits.loss, splits.items_per_sample) == ("cross_entropy", 32)
    n_bytes = len((importlib.resources.files("shardadam") / "data" / "corpus.txt").read_bytes())
    n_train = round(n_bytes * 0.9)
    # Train windows start every block_size // 2 bytes, eval windows every block_size bytes.
    assert len(splits.train) == (n_train - 33) // 16 + 1
    assert len(splits.eval) == (n_bytes - n_train - 33) // 32 + 1
    for dataset in (splits.train, splits.eval):
        for index in (0, len(dataset) - 1):
            x, y = dataset[index]
            assert x.shape == y.shape == (32,)
            assert x.dtype == y.dtype == torch.int64
            assert torch.equal(x[1:], y[:-1])  # the target is the input shifted by one byte
    with pytest.raises(IndexError):
        splits.train[len(splits.train)]


def test_text_corpus_windows_and_path(tmp_path):
    path = tmp_path / "digits.txt"
    path.write_bytes(bytes(range(100)))
    splits = text_corpus(block_size=4, eval_fraction=0.2, path=str(path))
    x, y = splits.train[3]
    assert x.tolist() == [6, 7, 8, 9] and y.tolist() == [7, 8, 9, 10]
    x, y = splits.eval[1]
    assert x.tolist() == [84, 85, 86, 87] and y.tolist() == [85, 86, 87, 88]
    assert len(splits.train) == (80 - 5) // 2 + 1 and len(splits.eval) == (20 - 5) // 4 + 1
    assert stack(splits.train, [0, 5, 2])[0].shape == (3, 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"block_size": 0}, ValueError, r"Invalid block_size: 0 \(expected an integer >= 2"),
        ({"block_size": 1}, ValueError, r"Invalid block_size: 1"),
        ({"block_size": 8.0}, ValueError, r"Invalid block_size: 8.0"),
        ({"eval_fraction": 0.0}, ValueError, r"Invalid eval_fraction: 0.0 \(expected 0 < "),
        ({"eval_fraction": 1.0}, ValueError, r"Invalid eval_fraction: 1.0"),
        ({"eval_fraction": "0.1"}, TypeError, r"Invalid eval_fraction: '0.1'"),
        ({"path": "/no/such/file.txt"}, ValueError, r"Invalid path: '/no/such/file.txt'"),
        ({"block_size": 10_000}, ValueError, r"Text too short: the embedded corpus has \d+ bytes"),
    ],
)
def test_text_corpus_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        text_corpus(**kwargs)


def test_text_corpus_too_short_file_names_it(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"a short text")
    with pytest.raises(ValueError, match=r"Text too short: '.*short.txt' has 12 bytes"):
        text_corpus(block_size=8, path=str(path))


def test_teacher_classification_items_sizes_and_determinism():
    splits = teacher_classification(n_train=100, n_eval=30, in_features=5, classes=3, seed=7)
    assert (len(splits.train), len(splits.eval)) == (100, 30)
    assert (splits.loss, splits.items_per_sample) == ("cross_entropy", 1)
    x, label = splits.train[0]
    assert x.shape == (5,) and x.dtype == torch.float32
    assert label.shape == () and label.dtype == torch.int64
    inputs, labels = stack(splits.train, range(100))
    assert set(labels.tolist()) <= {0, 1, 2} and len(set(labels.tolist())) > 1
    again = teacher_classification(n_train=100, n_eval=30, in_features=5, classes=3, seed=7)
    assert torch.equal(inputs, stack(again.train, range(100))[0])
    assert torch.equal(labels, stack(again.train, range(100))[1])
    other = teacher_classification(n_train=100, n_eval=30, in_features=5, classes=3, seed=8)
    assert not torch.equal(inputs, stack(other.train, range(100))[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_train": 0}, r"Invalid n_train: 0 \(expected an integer >= 1"),
        ({"classes": 1}, r"Invalid classes: 1 \(expected an integer >= 2"),
        ({"seed": -1}, r"Invalid seed: -1"),
    ],
)
def test_teacher_classification_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        teacher_classification(**kwargs)


def test_splits_rejects_unknown_loss():
    data = teacher_classification(n_train=4, n_eval=4)
    with pytest.raises(ValueError, match=r"Invalid loss: 'l1' \(expected one of"):
        Splits(train=data.train, eval=data.eval, loss="l1")


def test_check_splits_takes_both_sample_forms_and_names_what_is_wrong():
    pairs = teacher_classification(n_train=4, n_eval=4)
    check_splits(pairs)
    dicts = [{"input_ids": torch.zeros(3, dtype=torch.long), "labels": torch.zeros(3)}]
    check_splits(Splits(train=dicts, eval=dicts, loss="cross_entropy"))
    no_labels = [{"input_ids": torch.zeros(3)}]
    with pytest.raises(ValueError, match=r"data.eval\[0\] is a dict with keys \[.input_ids.\]"):
        check_splits(Splits(train=dicts, eval=no_labels, loss="cross_entropy"))
    triples = [(torch.zeros(1),) * 3]
    with pytest.raises(TypeError, match=r"data.train\[0\] is a 3-tuple; a sample is a pair"):
        check_splits(Splits(train=triples, eval=dicts, loss="mse"))
    with pytest.raises(TypeError, match=r"data._target_ built a dict without \['train', 'eval'"):
        check_splits({})
    with pytest.raises(ValueError, match="the data's train and eval splits must not be empty"):
        check_splits(Splits(train=[], eval=dicts, loss="mse"))


def test_transformer_shapes_and_determinism():
    torch.manual_seed(0)
    model = TinyTransformerLM(block_size=16, d_model=32, n_heads=4, n_layers=2)
    idx = torch.randint(0, 256, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 256) and logits.dtype == torch.float32
    assert model(idx[:, :5]).shape == (3, 5, 256)
    torch.manual_seed(0)
    again = TinyTransformerLM(block_size=16, d_model=32, n_heads=4, n_layers=2)
    assert torch.equal(logits, again(idx))


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = TinyTransformerLM(block_size=16, d_model=32, n_heads=4, n_layers=2)
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 30, "n_heads": 4}, r"Invalid n_heads: 4 \(expected a divisor of d_model=30"),
        ({"n_layers": 0}, r"Invalid n_layers: 0 \(expected an integer >= 1"),
        ({"block_size": 0}, r"Invalid block_size: 0"),
        ({"dropout": 1.5}, r"Invalid dropout: 1.5"),
    ],
)
def test_transformer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyTransformerLM(**kwargs)


def test_transformer_rejects_bad_input():
    model = TinyTransformerLM(block_size=8, d_model=16, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match=r"length 9 \(expected 1 <= length <= block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Invalid idx: a torch.float32 tensor of shape \(1, 4\)"):
        model(torch.zeros(1, 4))


def test_mlp_classifier_shapes_and_validation():
    assert MLPClassifier(in_features=5, hidden=8, classes=3)(torch.randn(7, 5)).shape == (7, 3)
    assert len(MLPClassifier(depth=0).layers) == 1  # a linear classifier
    with pytest.raises(ValueError, match=r"Invalid classes: 1 \(expected an integer >= 2"):
        MLPClassifier(classes=1)
    with pytest.raises(ValueError, match=r"Invalid depth: -1"):
        MLPClassifier(depth=-1)


def test_mlp_classifier_learns_the_teacher():
    torch.manual_seed(0)
    splits = teacher_classification(n_train=2048, n_eval=512)
    model = MLPClassifier()
    inputs, labels = splits.train.tensors
    eval_inputs, eval_labels = splits.eval.tensors

    def eval_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(eval_inputs), eval_labels).item()

    before = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = torch.Generator().manual_seed(1)
    for _ in range(60):
        idx = torch.randint(0, len(inputs), (64,), generator=batches)
        loss = F.cross_entropy(model(inputs[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (model(eval_inputs).argmax(dim=1) == eval_labels).float().mean().item()
    assert eval_loss() < 0.5 * before
    assert accuracy > 0.7  # chance is about 0.25 to 0.35 (the largest class)
