"""The paths users take around the happy path, in one process: each is right or refused.

References are independent of the code path under test: a fresh optimizer, torch's own
optimizer contract, or numbers computed from the same inputs another way.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from shardadam import ShardedAdam


def small_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(
        dtype
    )


def backward(model, seed):
    torch.manual_seed(100 + seed)
    x = torch.randn(16, 4, dtype=next(model.parameters()).dtype)
    model(x).float().pow(2).mean().backward()


def train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        opt.zero_grad()
        backward(model, s)
        opt.step()


# --------------------------------------------------------------- parameters changed outside


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weights_loaded_after_building_the_optimizer_are_trained_from(dtype):
    """model.load_state_dict(pretrained) after the optimizer exists: the next step starts
    from the loaded weights (for low precision too: the fp32 master is re-taken)."""
    model = small_model(dtype)
    opt = ShardedAdam(model.parameters(), learning_rate=0.01, jit_compile=False)
    train(model, opt, 3)
    pretrained = {k: v.clone() for k, v in small_model(dtype, seed=7).state_dict().items()}
    model.load_state_dict(pretrained)

    # Reference: the same optimizer state, rebuilt on the loaded weights (no stale master).
    reference = small_model(dtype, seed=7)
    ref_opt = ShardedAdam(reference.parameters(), learning_rate=0.01, jit_compile=False)
    saved = opt.state_dict()
    for entry in saved["state"].values():
        entry.pop("Adam/master", None)
    ref_opt.load_state_dict(saved)
    train(model, opt, 2, start=3)
    train(reference, ref_opt, 2, start=3)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    for p, loaded in zip(model.parameters(), pretrained.values()):
        # Two steps of lr 0.01 move each weight by at most ~0.02 from the loaded value.
        assert (p.float() - loaded.float()).abs().max() < 0.05


def test_in_place_reinitialisation_of_a_bf16_parameter_is_kept():
    model = small_model(torch.bfloat16)
    opt = ShardedAdam(model.parameters(), learning_rate=0.0, jit_compile=False)
    train(model, opt, 1)
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    train(model, opt, 1, start=1)
    assert torch.all(model[0].weight == 0.5)  # lr 0: the step writes back what is there


def test_a_checkpoint_loaded_into_the_model_alone_is_trained_from(tmp_path):
    from shardadam import checkpoint

    source = small_model(torch.bfloat16, seed=7)
    checkpoint.save(tmp_path, model=source, step=1)
    model = small_model(torch.bfloat16)
    opt = ShardedAdam(model.parameters(), learning_rate=0.0, jit_compile=False)
    train(model, opt, 1)
    checkpoint.load(tmp_path, model=model)  # without optimizer=
    train(model, opt, 1, start=1)  # lr 0: the step writes back what it starts from
    for p, q in zip(model.parameters(), source.parameters()):
        assert torch.equal(p, q)


# --------------------------------------------------------------- converted after building


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.double(),
        lambda m: m.half(),
        lambda m: m.to(memory_format=torch.channels_last),
    ],
    ids=["double", "half", "channels_last"],
)
def test_converting_the_model_after_building_the_optimizer_is_refused(convert):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    opt = ShardedAdam(model.named_parameters(), jit_compile=False)
    convert(model)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"parameter '0.weight' .* no longer a view .* build"):
        opt.step()
    assert opt.iterations == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


# --------------------------------------------------------------- pickling and copying


def test_pickling_or_copying_says_to_use_state_dict():
    opt = ShardedAdam(small_model().parameters(), jit_compile=False)
    for copier in (pickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(TypeError, match=r"cannot be pickled or copied.*state_dict\(\)"):
            copier(opt)


# --------------------------------------------------------------- torch's optimizer contract


def test_a_step_without_any_gradient_does_nothing_and_warns_as_keras():
    model = small_model()
    opt = ShardedAdam(model.parameters(), learning_rate=0.1, use_ema=True, jit_compile=False)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match=r"^No gradients provided for any variable.$"):
        opt.step()
    assert opt.iterations == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    # It did not count: the first real step is Keras's step 1 (its EMA takes the parameters).
    train(model, opt, 1)
    fresh_model = small_model()
    fresh = ShardedAdam(
        fresh_model.parameters(), learning_rate=0.1, use_ema=True, jit_compile=False
    )
    train(fresh_model, fresh, 1)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.moving_average(p), fresh.moving_average(q))


def test_an_empty_param_group_is_accepted():
    model = small_model()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = ShardedAdam(
        [{"params": weights}, {"params": [], "weight_decay": 0.0}, {"params": biases}],
        learning_rate=0.05,
        jit_compile=False,
    )
    opt.add_param_group({"params": []})
    other = small_model()
    named = ShardedAdam([{"params": list(other.named_parameters())}, {"params": []}])
    assert named.param_names() == [n for n, _ in other.named_parameters()]
    reference_model = small_model()
    reference = ShardedAdam(reference_model.parameters(), learning_rate=0.05, jit_compile=False)
    train(model, opt, 3)
    train(reference_model, reference, 3)
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    opt.load_state_dict(opt.state_dict())


def test_parameters_given_as_a_set_are_refused():
    params = set(small_model().parameters())
    with pytest.raises(TypeError, match=r"given as a set.*pass a list"):
        ShardedAdam(params)
    with pytest.raises(TypeError, match=r"\(param group 0\) are given as a set"):
        ShardedAdam([{"params": params}])


def test_a_one_element_tensor_learning_rate_equals_the_float():
    results = []
    for lr in (0.01, torch.tensor([0.01]), torch.tensor(0.01)):
        model = small_model()
        opt = ShardedAdam(model.parameters(), learning_rate=lr, jit_compile=False)
        train(model, opt, 3)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for p, q in zip(results[0], other):
            assert torch.equal(p, q)
    with pytest.raises(ValueError, match=r"1-element floating tensor"):
        ShardedAdam(small_model().parameters(), learning_rate=torch.tensor([0.1, 0.2]))


def test_load_state_dict_keeps_the_saved_param_names():
    model = small_model()
    named = ShardedAdam(model.named_parameters(), jit_compile=False)
    unnamed = ShardedAdam(small_model().parameters(), jit_compile=False)
    unnamed.load_state_dict(named.state_dict())
    assert unnamed.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    assert unnamed.state_dict()["param_groups"][0]["param_names"] == named.param_names()
    unnamed.exclude_from_weight_decay(var_names=["bias"])  # names now usable


def test_load_state_dict_rechecks_clipping_exclusivity():
    model = small_model()
    opt = ShardedAdam(model.parameters(), global_clipnorm=1.0, jit_compile=False)
    saved = opt.state_dict()
    saved["param_groups"][0]["clipnorm"] = 1.0
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"Only one of `clipnorm`.*param group 0 of the state"):
        opt.load_state_dict(saved)
    assert opt.state_dict()["param_groups"] == before["param_groups"]


# --------------------------------------------------------------- Keras's missing-gradient warning


def test_trainable_parameters_without_gradients_warn_once_like_keras():
    model = small_model()
    model[0].bias.requires_grad_(False)  # frozen: never warned about
    opt = ShardedAdam(model.named_parameters(), jit_compile=False)

    def step_with_grads(names):
        for n, p in model.named_parameters():
            p.grad = torch.ones_like(p) if n in names else None
        opt.step()

    with pytest.warns(UserWarning) as caught:
        step_with_grads({"0.weight", "2.weight"})
    messages = [str(w.message) for w in caught if "Gradients do not exist" in str(w.message)]
    assert messages == [
        "Gradients do not exist for variables ['2.bias'] when minimizing the loss. If using "
        "`model.compile()`, did you forget to provide a `loss` argument?"
    ]
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        step_with_grads({"0.weight", "2.weight"})  # the same set: no second warning
        step_with_grads({"0.weight", "2.weight", "2.bias"})  # complete: none
    assert not [w for w in again if "Gradients do not exist" in str(w.message)]
    with pytest.warns(UserWarning, match=r"variables \['0.weight', '2.bias'\]"):
        step_with_grads({"2.weight"})  # another set: warned


# --------------------------------------------------------------- torch.amp.GradScaler


def test_grad_scaler_is_refused_with_the_supported_ways():
    model = small_model()
    opt = ShardedAdam(model.parameters(), jit_compile=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    with pytest.raises(
        RuntimeError, match=r"GradScaler cannot drive ShardedAdam.*bf16.*loss_scale"
    ):
        scaler.step(opt)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert opt.iterations == 0
