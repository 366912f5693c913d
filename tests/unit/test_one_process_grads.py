"""One process: gradients land in the flat buffer during backward, with no second copy
(Note [gradients in one process])."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from shardadam import ShardedAdam


def build(jit_compile: bool = False, **kwargs) -> tuple[nn.Module, ShardedAdam]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 32))
    opt = ShardedAdam(model.parameters(), learning_rate=0.01, jit_compile=jit_compile, **kwargs)
    return model, opt


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return model(torch.randn(8, 64, generator=gen)).square().mean()


def grad_storages(model: nn.Module) -> set[int]:
    return {p.grad.untyped_storage().data_ptr() for p in model.parameters()}


def flat_grad_storages(opt: ShardedAdam) -> set[int]:
    return {b.flat_grad.untyped_storage().data_ptr() for b in opt.buffers}


def hand_fed_step(model: nn.Module, opt: ShardedAdam, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()


def test_backward_leaves_p_grad_as_a_view_and_step_takes_it():
    model, opt = build()
    loss_of(model, 0).backward()
    assert grad_storages(model) <= flat_grad_storages(opt)
    for p, view in zip(model.parameters(), opt.buffers[0].grad_views):
        assert p.grad.data_ptr() == view.data_ptr()
    opt.step()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_step_allocates_no_second_copy_of_the_gradients(jit_compile):
    model, opt = build(jit_compile=jit_compile)
    grad_nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for step in range(3):
        loss_of(model, step).backward()
        if step < 2:
            opt.step()  # warm-up: compilation, lazily built state
    # One copy of the gradients is alive: autograd's tensors were freed into the flat buffer.
    assert grad_storages(model) <= flat_grad_storages(opt)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    assert allocated < grad_nbytes / 20, (allocated, grad_nbytes)


def test_updates_equal_the_hand_fed_step():
    """Bound views, a second backward that adds in place, clipping by hand in between: the
    same updates as gradients assigned to p.grad just before step()."""
    model, opt = build()
    reference, reference_opt = build()
    reference_opt.close()  # no hooks: step() copies p.grad
    for step in range(3):
        loss_of(model, step).backward()
        loss_of(model, step + 10).backward()  # adds into the views in place
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        grads = [
            torch.autograd.grad(loss_of(reference, step), list(reference.parameters())),
            torch.autograd.grad(loss_of(reference, step + 10), list(reference.parameters())),
        ]
        summed = [a + b for a, b in zip(*grads)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in summed]))
        clipped = [g * min(1.0, 0.05 / (norm.item() + 1e-6)) for g in summed]
        opt.step()
        hand_fed_step(reference, reference_opt, clipped)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_p_grad_is_the_truth_at_step():
    """Reassigned after backward: the new value; set to None: no gradient (not updated)."""
    model, opt = build()
    reference, reference_opt = build()
    loss_of(model, 0).backward()
    first, second = model[0].weight, model[2].bias
    replacement = torch.full_like(first, 0.5)
    first.grad = replacement.clone()
    second.grad = None
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    before = second.detach().clone()
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        opt.step()
    torch.testing.assert_close(second, before, rtol=0, atol=0)
    for p, g in zip(reference.parameters(), grads):
        p.grad = g
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        reference_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_step_without_zero_grad_takes_only_the_new_gradients():
    """After step() p.grad is None, so the next backward is the next step's gradient alone,
    as across ranks (the update used the flat gradient as scratch)."""
    model, opt = build()
    reference, reference_opt = build()
    for step in range(3):
        loss_of(model, step).backward()  # no zero_grad between steps
        opt.step()
        grads = torch.autograd.grad(loss_of(reference, step), list(reference.parameters()))
        hand_fed_step(reference, reference_opt, list(grads))
        reference_opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_accumulation_micro_steps_keep_p_grad_as_torch_leaves_it():
    model, opt = build(gradient_accumulation_steps=2)
    loss_of(model, 0).backward()
    assert not grad_storages(model) & flat_grad_storages(opt)
    opt.step()
    assert all(p.grad is not None for p in model.parameters())


def test_a_compiled_bf16_model_fine_tuned_from_loaded_weights():
    """torch.compile'd (AOTAutograd's backward), bf16 with fp32 masters, weights loaded after
    the optimizer was built: the updates of gradients assigned by hand to an eager copy."""
    torch.manual_seed(1)
    pretrained = {k: v.to(torch.bfloat16) for k, v in build()[0].state_dict().items()}

    def fine_tuned(compiled: bool) -> list[torch.Tensor]:
        model = build()[0].to(torch.bfloat16)
        opt = ShardedAdam(model.parameters(), learning_rate=0.01, jit_compile=False)
        model.load_state_dict(pretrained)  # after the optimizer: its masters re-take them
        run = torch.compile(model, backend="aot_eager") if compiled else model
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(8, 64, generator=gen).to(torch.bfloat16)
            loss = run(x).float().square().mean()
            if compiled:
                loss.backward()
                assert grad_storages(model) <= flat_grad_storages(opt)
            else:  # by hand: the path that copies p.grad at step()
                grads = torch.autograd.grad(loss, list(model.parameters()))
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.clone()
            opt.step()
        return [p.detach().float() for p in model.parameters()]

    for a, b in zip(fine_tuned(True), fine_tuned(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
