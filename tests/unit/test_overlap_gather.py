"""overlap_param_gather in one process, with gathers that arrive only when waited for.

``LateGather`` stands in for the communicator: until a bucket's gather is waited for, its flat
buffer holds NaN, as a peer's chunk holds stale values while it is still arriving. Every read
that does not wait shows up as NaN; every result is compared with the same training without
overlap. Compiled cases use dynamo's "eager" backend: the waits are decided by tracing, guards
and graph breaks, which every backend shares (Note [gather and torch.compile]).
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from shardadam import ShardedAdam, comm, gather

STEPS = 3
pytestmark = pytest.mark.filterwarnings(
    # torch warns on every torch.compile(module) call while a global module hook exists.
    "ignore:Using `torch.compile\\(module\\)` when there are global hooks:UserWarning"
)


class TiedNet(torch.nn.Module):
    """The parent indexes the embedding table itself and reuses it as the output head, so the
    embedding module is never called and no hook of its runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(13, 8)
        self.body = torch.nn.Linear(8, 8)
        self.scale = torch.nn.Parameter(torch.ones(8))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(self.embed.weight[idx])) * self.scale
        return F.linear(h, self.embed.weight)


class LateGather:
    """All-gathers that arrive when waited for; NaN in the flat buffer until then."""

    active = True
    rank, world_size = 0, 1

    def start_all_gather(self, flat: torch.Tensor) -> comm.Pending:
        arrived = flat.clone()
        flat.fill_(float("nan"))
        return comm.Pending([], lambda: flat.copy_(arrived))


def build(overlap: bool, device: str = "cpu") -> tuple[TiedNet, ShardedAdam]:
    model = TiedNet().to(device)
    # A group per parameter: in one process each has a buffer of its own, gathered and
    # waited for on its own.
    opt = ShardedAdam(
        [{"params": [named]} for named in model.named_parameters()],
        learning_rate=0.05,
        jit_compile=False,
        overlap_param_gather=overlap,
    )
    if overlap:
        opt._param_gather.comm = LateGather()
    return model, opt


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 13, (5,), generator=torch.Generator().manual_seed(step))


def train(overlap: bool, forward_of=None, after_step=None, device: str = "cpu") -> dict:
    """Steps of the forward ``forward_of(model)`` (the model's by default), and what
    ``after_step`` reads after each step."""
    model, opt = build(overlap, device)
    forward = model if forward_of is None else forward_of(model)
    outputs, reads = [], []
    for step in range(STEPS):
        out = forward(batch(step).to(device))
        outputs.append(out.detach().clone())
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            reads.append(after_step(model))
    outputs.append(forward(batch(STEPS).to(device)).detach().clone())
    opt.wait_for_params()
    return {
        "outputs": outputs,
        "reads": reads,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def assert_same(ours: dict, reference: dict) -> None:
    for key in ("outputs", "reads"):
        assert len(ours[key]) == len(reference[key])
        for i, (a, b) in enumerate(zip(ours[key], reference[key])):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{key}[{i}] differs")
    for name, value in reference["params"].items():
        torch.testing.assert_close(ours["params"][name], value, rtol=0, atol=0, msg=name)


@pytest.fixture(autouse=True)
def no_guard_left_behind():
    yield
    assert not gather._in_flight, "a gather is still in flight after the test"
    assert torch._C._len_torch_function_stack() == 0, "a torch-function mode was left"
    assert gather._hook is None, "the global forward hook was left registered"


def test_tied_head_read_by_the_parent_waits():
    assert_same(train(True), train(False))


def read_outside_forward(model: TiedNet) -> torch.Tensor:
    """Reads right after step(): a norm, a view made before the step, the state dict,
    printing, a list argument, a keyword argument and ``.data``."""
    assert "nan" not in repr(model.scale)
    reads = [model.body.weight.norm(), model.tied_view.sum()]
    reads += [v.sum() for v in model.state_dict().values()]
    reads.append(torch.cat([model.body.bias, model.scale]).sum())
    reads.append(torch.add(torch.zeros(8), other=model.scale).sum())
    reads.append(model.embed.weight.data.sum())
    return torch.stack(reads)


def with_view(model: TiedNet) -> TiedNet:
    model.tied_view = model.embed.weight.t()  # a view made before any step
    return model


def test_reads_outside_forward_wait():
    ours = train(True, forward_of=with_view, after_step=read_outside_forward)
    assert_same(ours, train(False, forward_of=with_view, after_step=read_outside_forward))


def test_load_state_dict_waits_before_writing():
    model, opt = build(True)
    model(batch(0)).square().mean().backward()
    opt.step()
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    opt.wait_for_params()  # a gather arriving late must not overwrite what was loaded
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in model.state_dict().values())


def compile_forward(kind: str, model: TiedNet):
    if kind == "torch.compile(model)":
        return torch.compile(model, backend="eager")
    if kind == "model.compile()":
        model.compile(backend="eager")
        return model
    return torch.compile(lambda idx: model(idx) * 1.0, backend="eager")


@pytest.mark.parametrize("kind", ["torch.compile(model)", "model.compile()", "compiled function"])
def test_compiled_forward_waits(kind):
    results = []
    for overlap in (True, False):
        torch._dynamo.reset()
        results.append(train(overlap, forward_of=lambda model: compile_forward(kind, model)))
    assert_same(*results)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["eager", "model.compile()"])
def test_waits_on_cuda(kind):
    """The guard finds CUDA parameters by address too; waits are made on the current stream."""
    results = []
    for overlap in (True, False):
        torch._dynamo.reset()
        forward_of = None if kind == "eager" else lambda model: compile_forward(kind, model)
        results.append(train(overlap, forward_of=forward_of, device="cuda"))
    assert_same(*results)


def test_compiled_read_before_any_module_is_refused():
    torch._dynamo.reset()
    model, opt = build(True)

    @torch.compile(backend="eager")
    def forward(idx):
        width = model.scale.shape[0] + model.scale.size(0)  # metadata: no need to wait
        return model(idx) * width + model.scale.sum()

    @torch.compile(backend="eager")
    def regularised(idx):
        return model.scale.square().sum() + model(idx).sum()

    forward(batch(0)).square().mean().backward()
    opt.step()
    # a module call first: waits, then runs compiled
    forward(batch(1)).square().mean().backward()
    opt.step()
    with pytest.raises(RuntimeError, match=r"rank 0/1: overlap_param_gather=True cannot .*'scale'"):
        regularised(batch(2))
    opt.wait_for_params()
    regularised(batch(2))  # nothing in flight: runs


def test_fullgraph_names_the_remedy():
    torch._dynamo.reset()
    model, opt = build(True)
    model.compile(backend="eager", fullgraph=True)
    model(batch(0)).square().mean().backward()
    opt.step()
    with pytest.raises(Exception, match="overlap_param_gather=True"):
        model(batch(1))
    opt.wait_for_params()


class Recording(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_user_modes_keep_their_order():
    model, opt = build(True)
    reference_model, reference_opt = build(False)
    outer, inner = Recording(), Recording()
    torch.set_default_device("cpu")  # a context that must stay lowest on the stack
    try:
        with torch.device("cpu"), outer:
            for m, o in ((model, opt), (reference_model, reference_opt)):
                m(batch(0)).square().mean().backward()
                o.step()
            with inner:  # entered and left while the gathers are in flight
                out = model(batch(1))
            assert inner.calls > 0
            torch.testing.assert_close(out, reference_model(batch(1)), rtol=0, atol=0)
            out.square().mean().backward()
            opt.step()  # left in flight when the user's modes exit
        torch.set_default_device(None)  # while in flight
    finally:
        torch.set_default_device(None)
    assert torch._C._len_torch_function_stack() == 1  # ours, taken out at the wait
    with Recording():
        opt.wait_for_params()  # ours is taken out from below the user's mode
        assert torch._C._len_torch_function_stack() == 1
    assert outer.calls > 0


def test_activation_checkpointing_recomputes_with_gathered_values():
    from torch.utils.checkpoint import checkpoint

    def run(overlap: bool) -> list[torch.Tensor]:
        model, opt = build(overlap)
        grads = []
        for step in range(STEPS):
            out = checkpoint(model, batch(step), use_reentrant=False)
            out.square().mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            opt.step()
            opt.zero_grad()
        opt.wait_for_params()
        return grads

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_save_waits():
    model, opt = build(True)
    model(batch(0)).square().mean().backward()
    opt.step()
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    opt.wait_for_params()
    saved.seek(0)
    loaded = torch.load(saved)
    assert all(torch.equal(loaded[n], p) for n, p in model.state_dict().items())


def test_guards_go_away_once_everything_arrived():
    model, opt = build(True)
    model(batch(0)).square().mean().backward()
    opt.step()
    assert torch._C._len_torch_function_stack() == 1 and gather._hook is not None
    sums = [p.sum() for p in model.parameters()]  # the last wait runs inside the guard
    assert not gather._in_flight and all(torch.isfinite(s) for s in sums)
    model(batch(1))  # the next hook call takes the guard off, then the hook itself
    assert torch._C._len_torch_function_stack() == 0 and gather._hook is None


def test_a_guard_taken_off_by_someone_else_is_replaced():
    model, opt = build(True)
    model(batch(0)).square().mean().backward()
    opt.step()
    torch._C._pop_torch_function_stack()  # someone pops what is on top: the guard
    opt.wait_for_params()
    model(batch(1)).square().mean().backward()
    opt.step()
    assert torch._C._len_torch_function_stack() == 1
    assert torch.isfinite(model(batch(2))).all()  # NaN where a read did not wait
    assert torch._C._len_torch_function_stack() == 0 and gather._hook is None
