"""overlap_param_gather=True with one rank's gather late, against the same training without
overlap: shared weights, reads outside forward, compiled models.

At every step one rank (rank ``step % world_size``) is late: it posts the gather of a bucket
only once it waits for that bucket itself (in buffer order, the order every rank posts them
in, so that point-to-point messages still match), and the rest after its forward. Until then
the other ranks hold last step's values of its chunks, so a read that does not wait sees them,
deterministically. Compiled cases use dynamo's "eager" backend: which waits happen is decided
by tracing, guards and graph breaks, the same for every backend (Note [gather and
torch.compile] in ``shardadam.gather``).
"""

from __future__ import annotations

import datetime
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

STEPS = 3
TIMEOUT_S = 20  # a forward waiting for a gather that never comes fails, not hangs
KWARGS = {"learning_rate": 0.05, "bucket_cap_mb": 0.0002, "jit_compile": False}
CASES = ("tied head", "reads after step", "torch.compile(model)", "model.compile()")
REFUSAL = "overlap_param_gather=True cannot let compiled code read parameter"


class TiedNet(torch.nn.Module):
    """The parent indexes the embedding table itself and reuses it as the output head, so no
    hook of the embedding module ever runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(13, 8)
        self.body = torch.nn.Linear(8, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.body(self.embed.weight[idx])), self.embed.weight)


def batch(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randint(0, 13, (6,), generator=gen)


class LateRank:
    """Makes rank ``k % world_size`` late with the gathers of the optimizer's k-th step."""

    def __init__(self, opt, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.comm = opt._param_gather.comm
        self.start_all_gather = self.comm.start_all_gather
        self.gather = opt._param_gather.gather
        self.steps, self.late = 0, False
        self.queue: list[LatePending] = []
        opt._param_gather.gather = self.late_gather
        self.comm.start_all_gather = self.late_start

    def late_gather(self, overlap: bool = False) -> None:
        self.late = self.steps % self.world_size == self.rank
        self.steps += 1
        self.gather(overlap)

    def late_start(self, flat: torch.Tensor):
        if not self.late:
            return self.start_all_gather(flat)
        self.queue.append(LatePending(self, flat))
        return self.queue[-1]

    def post_through(self, pending: LatePending | None = None) -> None:
        """Post the queued gathers in order, up to ``pending`` (all by default)."""
        while self.queue:
            first = self.queue.pop(0)
            # Not through the optimizer's read guard: posting views this bucket's flat buffer,
            # which the guard would wait for - posting a later bucket first.
            with torch._C.DisableTorchFunction():
                first.posted = self.start_all_gather(first.flat)
            if first is pending:
                return


class LatePending:
    def __init__(self, late: LateRank, flat: torch.Tensor) -> None:
        self.late, self.flat, self.posted = late, flat, None

    def wait(self) -> None:
        if self.posted is None:
            self.late.post_through(self)
        self.posted.wait()


def read_after_step(model: TiedNet) -> torch.Tensor:
    """What a training loop reads right after step(): norms for logging, the state dict."""
    reads = [p.norm() for p in model.parameters()]
    reads += [v.sum() for v in model.state_dict().values()]
    return torch.stack(reads)


def forward_of(case: str, model: TiedNet):
    if case == "torch.compile(model)":
        # torch warns on every call of a compiled module while a global module hook exists.
        warnings.filterwarnings("ignore", "Using `torch.compile\\(module\\)`", UserWarning)
        return torch.compile(model, backend="eager")
    if case == "model.compile()":
        model.compile(backend="eager")
    return model


def train(case: str, rank: int, world_size: int, group, overlap: bool) -> dict:
    from shardadam import ShardedAdam

    torch._dynamo.reset()
    model = TiedNet()
    opt = ShardedAdam(
        model.named_parameters(), process_group=group, overlap_param_gather=overlap, **KWARGS
    )
    late = LateRank(opt, rank, world_size)
    forward = forward_of(case, model)
    outputs, reads = [], []
    for step in range(STEPS + 1):
        out = forward(batch(rank, step))
        outputs.append(out.detach().clone())
        late.post_through()  # before the next collectives: their messages must not cross
        if step == STEPS:
            break
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        if case == "reads after step":
            reads.append(read_after_step(model))
    opt.wait_for_params()
    return {
        "outputs": outputs,
        "reads": reads,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def refused_compiled_read(rank: int, world_size: int, group) -> str:
    """A compiled function that reads a parameter before any module call: refused on every
    rank at the first call after a step; nothing hangs, and it runs once waited for."""
    from shardadam import ShardedAdam

    torch._dynamo.reset()
    model = TiedNet()
    opt = ShardedAdam(
        model.named_parameters(), process_group=group, overlap_param_gather=True, **KWARGS
    )
    late = LateRank(opt, rank, world_size)

    @torch.compile(backend="eager")
    def regularised(idx):
        return model.body.bias.square().sum() + model(idx).square().mean()

    regularised(batch(rank, 0)).backward()
    opt.step()
    error = ""
    try:
        regularised(batch(rank, 1))
    except RuntimeError as e:
        error = str(e)
    late.post_through()
    opt.wait_for_params()
    regularised(batch(rank, 1)).backward()
    opt.step()  # the ranks are still in step with each other
    opt.wait_for_params()
    return error


def run_cases(rank: int, world_size: int) -> dict:
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    # One reference for every case: the same training, eager and without overlap.
    results = {"reference": train("reads after step", rank, world_size, group, overlap=False)}
    for case in CASES:
        results[case] = train(case, rank, world_size, group, overlap=True)
    results["refused"] = refused_compiled_read(rank, world_size, group)
    return results
