"""The training app with models from outside it: a transformers GPT-2, models returning a tuple
or a dict or their own loss, dict samples, padded targets, and an output of the wrong shape.

The expected losses are formulas over the initial model, which the test rebuilds as the app
does (``torch.manual_seed(trainer.seed)``, then the model): with ``trainer.batch_size`` equal
to the training split, step 1's batch is the whole split, in whatever order.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.nn import functional as F

from tests.integration import app_models
from tests.integration.test_train_app import REPO, metrics, run_app

TORCHRUN = [str(REPO / "launch" / "torchrun.sh")]  # two ranks unless NPROC_PER_NODE says
LAUNCH_ENV = {"PYTHON": sys.executable}

TAGS = dict(n_train=24, n_eval=16, length=6, vocab=11, classes=5)
REGRESSION = dict(n_train=32, n_eval=16, features=4)
ONE_STEP = ["trainer.steps=1", "trainer.eval_every=0", "trainer.checkpoint_every=0"]


def first_losses(run_dir) -> tuple[float, float]:
    """Step 1's training loss and the held-out loss before training, from metrics.jsonl."""
    records = metrics(run_dir)
    train = next(m["loss"] for m in records if m.get("step") == 1 and "loss" in m)
    held_out = next(m["eval_loss_weights"] for m in records if m.get("step") == 0)
    return train, held_out


def test_padded_targets_count_for_nothing_in_the_global_mean_on_two_ranks(tmp_path):
    """A tuple output; -100 tags left out of the mean over the whole batch, although the two
    ranks' halves hold different numbers of counted tags (the old code divided by all tags)."""
    arguments = ",".join(f"{k}:{v}" for k, v in TAGS.items())
    done, out = run_app(
        "~model", f"+model={{_target_:tests.integration.app_models.TupleTagger,"
        f"vocab:{TAGS['vocab']},classes:{TAGS['classes']}}}",
        "~data", f"+data={{_target_:tests.integration.app_models.padded_tags,{arguments}}}",
        f"trainer.batch_size={TAGS['n_train']}", *ONE_STEP, f"hydra.run.dir={tmp_path}",
        launcher=TORCHRUN, env=LAUNCH_ENV,
    )  # fmt: skip
    assert done.returncode == 0, out
    assert "ranks: 2;" in out
    splits = app_models.padded_tags(**TAGS)
    torch.manual_seed(0)
    model = app_models.TupleTagger(TAGS["vocab"], TAGS["classes"])
    expected = []
    for split in (splits.train, splits.eval):
        tokens, tags = split.tensors
        counted = tags != -100
        log_p = torch.log_softmax(model(tokens)[0].double(), dim=-1)
        picked = log_p.gather(-1, tags.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        expected.append((-(picked * counted).sum() / counted.sum()).item())
        assert 0.2 < counted.float().mean() < 0.8  # much padding, so the old mean was far off
    assert first_losses(tmp_path) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "own_loss, loss_override, formula",
    [
        # The model's own loss (dict samples hold labels): its mean absolute error.
        (True, [], lambda out, y: (out - y).abs().mean()),
        # trainer.loss wins over the model's own.
        (True, ["trainer.loss={_target_:torch.nn.SmoothL1Loss,beta:0.5}"],
         lambda out, y: F.smooth_l1_loss(out, y, beta=0.5)),
        # A dict output without a loss: the data's mse on its logits.
        (False, [], lambda out, y: F.mse_loss(out, y)),
    ],
)  # fmt: skip
def test_dict_samples_and_dict_outputs_use_the_loss_that_applies(
    tmp_path, own_loss, loss_override, formula
):
    arguments = ",".join(f"{k}:{v}" for k, v in REGRESSION.items())
    done, out = run_app(
        "~model", "+model={_target_:tests.integration.app_models.DictRegressor,"
        f"features:{REGRESSION['features']},own_loss:{str(own_loss).lower()}}}",
        "~data", f"+data={{_target_:tests.integration.app_models.regression,{arguments},"
        "dict_samples:true}",
        f"trainer.batch_size={REGRESSION['n_train']}", *ONE_STEP, *loss_override,
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert done.returncode == 0, out
    splits = app_models.regression(**REGRESSION, dict_samples=True)
    torch.manual_seed(0)
    model = app_models.DictRegressor(REGRESSION["features"], own_loss=False)
    with torch.no_grad():
        expected = [
            formula(model(split.x)["logits"], split.y).item()
            for split in (splits.train, splits.eval)
        ]
    assert first_losses(tmp_path) == pytest.approx(expected, rel=1e-5)


def test_an_output_of_another_shape_than_the_targets_fails_before_training(tmp_path):
    arguments = ",".join(f"{k}:{v}" for k, v in REGRESSION.items())
    done, out = run_app(
        "~model", "+model={_target_:torch.nn.Linear,in_features:4,out_features:1}",
        "~data", f"+data={{_target_:tests.integration.app_models.regression,{arguments},"
        "dict_samples:false}",
        "trainer.batch_size=8", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert done.returncode != 0
    assert (
        "the model's output has shape (8, 1) but the targets (8,): for loss mse they must be "
        "equal (torch would broadcast them); return output.squeeze(-1)" in out
    ), out
    assert "held-out loss" not in out  # the first loss, before training, fails


GPT2 = (
    "+model={_target_:transformers.GPT2LMHeadModel,config:{_target_:transformers.GPT2Config,"
    "n_layer:2,n_embd:32,n_head:2,vocab_size:256,n_positions:64,bos_token_id:0,eos_token_id:0,"
    "resid_pdrop:0,embd_pdrop:0,attn_pdrop:0}}"
)


def test_a_transformers_gpt2_trains_alike_on_one_and_two_ranks(tmp_path):
    pytest.importorskip("transformers")
    common = [
        "~model", GPT2, "data=text_corpus", "data.block_size=16", "trainer.batch_size=8",
        "trainer.steps=8", "trainer.eval_every=0", "trainer.eval_samples=32",
        "~optimizer/schedule", "optimizer.learning_rate=0.003",
    ]  # fmt: skip
    losses = {}
    # Two ranks also load through DataLoader workers: the same batches.
    for ranks, launcher, workers in ((1, None, 0), (2, TORCHRUN, 1)):
        run_dir = tmp_path / f"ranks-{ranks}"
        done, out = run_app(
            *common, f"trainer.num_workers={workers}", f"hydra.run.dir={run_dir}",
            launcher=launcher,
            env={**LAUNCH_ENV, "NPROC_PER_NODE": str(ranks)},
        )  # fmt: skip
        assert done.returncode == 0, out
        assert f"ranks: {ranks};" in out
        losses[ranks] = [m["loss"] for m in metrics(run_dir) if "loss" in m]
        held_out = [m["eval_loss_weights"] for m in metrics(run_dir) if "eval_loss_weights" in m]
        assert held_out[-1] < held_out[0] - 0.5, out  # from ln 256 = 5.5
    assert losses[1][-1] < losses[1][0] - 0.5
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)


def test_a_config_dir_of_the_users_adds_a_model_config(tmp_path):
    """`--config-dir` beside the packaged configs: the repository's example directory of user
    configs (configs/, a GPT-2 from transformers) composes with them and trains."""
    done, out = run_app(
        "model=gpt2_tiny", "data.block_size=16", "trainer.steps=2", "trainer.eval_samples=16",
        f"hydra.run.dir={tmp_path}",
        launcher=[sys.executable, "-m", "shardadam.train", "--config-dir", str(REPO / "configs")],
    )  # fmt: skip
    assert done.returncode == 0, out
    losses = [m["loss"] for m in metrics(tmp_path) if "loss" in m]
    assert len(losses) == 2 and all(2.0 < x < 7.0 for x in losses)  # ln 256 = 5.5 at the start
    assert (
        "_target_: transformers.GPT2LMHeadModel"
        in (tmp_path / ".hydra" / "config.yaml").read_text()
    )
