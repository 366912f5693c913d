"""The training app's loss (shardadam.losses): outputs of any kind, which loss applies, padded
targets, shape errors, and the global mean over ranks against one process."""

from __future__ import annotations

import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from shardadam.app_config import TrainerConfig
from shardadam.losses import (
    HeldOutTotal,
    LossTerms,
    TrainingLoss,
    model_prediction,
    rank_loss,
    share_of_global_mean,
)

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
TAGS = torch.tensor([0, 2, -100, 1])


def cross_entropy_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Sum over the counted items of log(sum exp) - logit[target], and their number."""
    total, count = 0.0, 0
    for row, target in zip(logits.tolist(), targets.tolist()):
        if target != -100:
            total += math.log(sum(math.exp(v) for v in row)) - row[target]
            count += 1
    return total, count


@pytest.mark.parametrize(
    "output",
    [
        LOGITS,
        (LOGITS, torch.zeros(1)),
        [LOGITS],
        {"logits": LOGITS, "hidden": torch.zeros(1)},
        OrderedDict(logits=LOGITS),  # a transformers ModelOutput is an OrderedDict
        SimpleNamespace(logits=LOGITS, loss=None),
    ],
    ids=["tensor", "tuple", "list", "dict", "ordered-dict", "attribute"],
)
def test_any_kind_of_output_gives_the_summed_cross_entropy_without_padding(output):
    assert model_prediction(output) is LOGITS
    terms = TrainingLoss("cross_entropy").terms(output, TAGS, labels_given=False)
    total, count = cross_entropy_by_hand(LOGITS, TAGS)
    assert terms.value.item() == pytest.approx(total, rel=1e-6)
    assert terms.count.item() == count == 3


def test_a_transformers_model_output_gives_its_logits_and_its_loss():
    outputs = pytest.importorskip("transformers.modeling_outputs")
    output = outputs.CausalLMOutput(loss=torch.tensor(0.25), logits=LOGITS)
    assert model_prediction(output) is LOGITS
    terms = TrainingLoss("cross_entropy").terms(output, TAGS, labels_given=True)
    assert (terms.value.item(), terms.count) == (0.25, None)


def test_which_loss_applies_the_custom_then_the_models_then_the_datas():
    prediction, targets = torch.tensor([0.0, 1.0, 4.0]), torch.tensor([1.0, 1.0, 1.0])
    output = {"logits": prediction, "loss": torch.tensor(7.0)}
    data_loss = TrainingLoss("mse")
    # The model's own loss only where it was given the labels.
    assert data_loss.terms(output, targets, labels_given=True).value.item() == 7.0
    without_labels = data_loss.terms(output, targets, labels_given=False)
    assert (without_labels.value.item(), without_labels.count.item()) == (1.0 + 0.0 + 9.0, 3)
    custom = TrainingLoss("mse", custom=torch.nn.L1Loss())
    assert custom.terms(output, targets, labels_given=True).value.item() == pytest.approx(4 / 3)
    assert custom.terms(output, targets, labels_given=True).count is None


def test_a_custom_loss_is_given_cross_entropy_inputs_flattened():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 4, -100], [2, -100, 1]])
    seen = []

    def loss(prediction, target):
        seen.append((tuple(prediction.shape), tuple(target.shape)))
        return F.cross_entropy(prediction, target)

    value = TrainingLoss("cross_entropy", custom=loss).terms(logits, targets, False).value
    assert seen == [((6, 5), (6,))]
    total, count = cross_entropy_by_hand(logits.flatten(0, 1), targets.flatten())
    assert value.item() == pytest.approx(total / count, rel=1e-6)


def test_the_ignore_index_is_configurable():
    targets = torch.tensor([0, 2, 7, 1])
    terms = TrainingLoss("cross_entropy", ignore_index=7).terms(LOGITS, targets, False)
    total, count = cross_entropy_by_hand(LOGITS, torch.tensor([0, 2, -100, 1]))
    assert terms.value.item() == pytest.approx(total, rel=1e-6) and terms.count.item() == count


def test_global_mean_over_two_ranks_equals_one_process_in_value_and_gradient():
    """Two simulated ranks holding different numbers of counted items: the mean of their
    backward losses, and of their gradients (as the reducer averages), are one process's."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=generator, requires_grad=True)
    inputs = torch.randn(8, 4, generator=generator)
    targets = torch.tensor([0, -100, -100, 2, 1, 1, 0, 2])  # 2 counted, then 4
    loss = TrainingLoss("cross_entropy")

    whole = F.cross_entropy(inputs @ weight, targets)  # torch's own mean over counted items
    (whole_grad,) = torch.autograd.grad(whole, weight)
    halves = ((inputs[:4], targets[:4]), (inputs[4:], targets[4:]))
    shares = [loss.terms(x @ weight, y, labels_given=False) for x, y in halves]
    count = sum(terms.count for terms in shares)
    rank_losses = [share_of_global_mean(terms, 2, count) for terms in shares]
    grads = [torch.autograd.grad(value, weight)[0] for value in rank_losses]
    assert (sum(rank_losses) / 2).item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close((grads[0] + grads[1]) / 2, whole_grad)
    # Each rank's own mean, averaged, is another number: what a per-rank mean would train on.
    per_rank = sum(terms.value / terms.count for terms in shares) / 2
    assert abs(per_rank.item() - whole.item()) > 0.05


def test_one_process_backward_loss_is_the_mean_and_a_mean_passes_unchanged():
    terms = TrainingLoss("cross_entropy").terms(LOGITS, TAGS, False)
    total, count = cross_entropy_by_hand(LOGITS, TAGS)
    assert rank_loss(terms, world_size=1).item() == pytest.approx(total / count, rel=1e-6)
    mean = LossTerms(torch.tensor(0.75), None)
    assert share_of_global_mean(mean, 4, None).item() == 0.75
    padding_only = LossTerms(torch.tensor(0.0), torch.tensor(0))
    assert rank_loss(padding_only, 1).item() == 0.0  # not nan


def test_held_out_total_sums_exactly_and_weighs_means_by_samples():
    total = HeldOutTotal(torch.device("cpu"))
    total.add(LossTerms(torch.tensor(6.0), torch.tensor(3)), samples=2)
    total.add(LossTerms(torch.tensor(2.0), torch.tensor(1)), samples=1)
    assert total.mean(world_size=1) == 2.0  # 8 / 4 items
    means = HeldOutTotal(torch.device("cpu"))
    means.add(LossTerms(torch.tensor(1.0), None), samples=3)
    means.add(LossTerms(torch.tensor(3.0), None), samples=1)
    assert means.mean(world_size=1) == 1.5  # (3 * 1 + 1 * 3) / 4 samples
    nothing = HeldOutTotal(torch.device("cpu"))
    nothing.add(LossTerms(torch.tensor(0.0), torch.tensor(0)), samples=4)
    with pytest.raises(ValueError, match="hold no target that counts"):
        nothing.mean(world_size=1)


@pytest.mark.parametrize(
    "kind, output, targets, message",
    [
        ("mse", torch.zeros(8, 1), torch.zeros(8),
         r"the model's output has shape \(8, 1\) but the targets \(8,\): for loss mse they must "
         r"be equal \(torch would broadcast them\); return output.squeeze\(-1\)"),
        ("mse", torch.zeros(8, 2), torch.zeros(8, 3),
         r"shape \(8, 2\) but the targets \(8, 3\).*reshape the model's output or the data's"),
        ("cross_entropy", torch.zeros(4, 5, 3), torch.zeros(4, 6, dtype=torch.long),
         r"output has shape \(4, 5, 3\) and the targets \(4, 6\): for loss cross_entropy the "
         r"output is logits \(..., classes\) for targets \(...\), so output.shape\[:-1\] must "
         r"equal the targets' shape; make the model return \(4, 6, 'classes'\)"),
        ("cross_entropy", torch.zeros(4), torch.zeros(4, dtype=torch.long),
         r"output has shape \(4,\) and the targets \(4,\)"),
        ("cross_entropy", torch.zeros(4, 3), torch.zeros(4),
         "targets are torch.float32, but loss cross_entropy takes class indices"),
    ],
)  # fmt: skip
def test_shape_and_dtype_mismatches_name_both_and_the_fix(kind, output, targets, message):
    with pytest.raises(ValueError, match=message):
        TrainingLoss(kind).terms(output, targets, labels_given=False)


@pytest.mark.parametrize(
    "output, error, message",
    [
        ({"hidden": LOGITS}, TypeError, r"dict with keys \['hidden'\] but no 'logits'"),
        ((), TypeError, "the model returned a tuple holding NoneType"),
        ("text", TypeError, "the model returned a str holding str; expected a tensor"),
    ],
)
def test_outputs_the_app_cannot_read_are_refused(output, error, message):
    with pytest.raises(error, match=message):
        TrainingLoss("cross_entropy").terms(output, TAGS, labels_given=False)


def test_non_scalar_losses_and_bad_settings_are_refused():
    per_item = TrainingLoss("mse", custom=torch.nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match=r"trainer.loss is \(3,\), expected a scalar tensor"):
        per_item.terms(torch.zeros(3), torch.ones(3), labels_given=False)
    model_loss = {"logits": torch.zeros(3), "loss": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"the model's loss is \(3,\), expected a scalar"):
        TrainingLoss("mse").terms(model_loss, torch.ones(3), labels_given=True)
    with pytest.raises(TypeError, match="trainer.loss built a int, which cannot be called"):
        TrainingLoss("mse", custom=3)
    with pytest.raises(ValueError, match=r"Invalid loss of the data: 'l1' \(expected one of"):
        TrainingLoss("l1")
    with pytest.raises(ValueError, match=r"Invalid trainer.loss: 'mse' \(expected null for the"):
        TrainerConfig(loss="mse")
    with pytest.raises(TypeError, match=r"Invalid trainer.ignore_index: 1.5 \(expected an int"):
        TrainerConfig(ignore_index=1.5)
    assert TrainerConfig(loss={"_target_": "torch.nn.L1Loss"}).loss["_target_"]
