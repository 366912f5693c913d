"""Training-step time and memory of shardadam against the optimizers people use instead.

    python benchmarks/train_step.py [--world-sizes 1 2 4] [--rounds 2] [--steps 20]

Trains a ~50M-parameter MLP with uneven layer sizes on gloo ranks (CPU), for
  - shardadam stage 1 and stage 2 (compiled update, comm="auto");
  - DDP + torch.optim.AdamW (fused, foreach);
  - DDP + ZeroRedundancyOptimizer(AdamW, fused);
  - FSDP2 (fully_shard per layer) + AdamW;
at world size 1 the DDP rows are plain AdamW (and ZeroRedundancyOptimizer) with no DDP.

Per world size it prints three tables (rank 0's numbers unless a column says otherwise):
  1. median and best step time, time in step(), speed against DDP + fused AdamW in the same
     run, the final loss (mean over ranks) and a fixed CPU probe (a matmul) timed beside each
     run, which shows when the machine was slow;
  2. the step's medians by phase: forward, backward, step(), and for shardadam inside step():
     the wait for the gradient reductions, the update, the parameter gather and the rest;
  3. bytes per rank: optimizer state, gradients held after backward and between steps, the
     optimizer's own peak (memory_report()["peak"]), peak RSS (rank 0 and the maximum over
     ranks), rank 0's peak RSS after the first step's backward and after its step(), and the
     phase and step in which rank 0's peak RSS came within 1% of its final value.
Then one line per world size compares the final losses with world size 1's.

A step is forward, backward, step(), zero_grad(); its time leaves out the byte counts taken after
backward. "Gradients" are the bytes of live p.grad tensors plus, for DDP, its buckets and, for
shardadam, its reduced shards, full flat buffers, late-gradient buffers and receive buffers.

Every implementation runs in fresh processes (so that peak RSS is its own), interleaved round by
round with the others because the machine is noisy. All start from the same weights and see the
same data: a global batch of 32 samples per step, split across the ranks, so that any world size
computes the same steps as one process. With lr 1e-4 and no weight decay shardadam's
losses at every world size agree with one process's to float rounding, the others' with
shardadam's up to Adam's epsilon placement (shardadam follows Keras's).
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

IMPLS = [
    "shardadam stage 1",
    "shardadam stage 2",
    "DDP + AdamW fused",
    "DDP + AdamW foreach",
    "ZeRO-1 (AdamW fused)",
    "FSDP2 + AdamW",
]
REFERENCE = "DDP + AdamW fused"  # the ratio column's peer
WIDTHS = [1024, 7000, 1500, 3000, 2500, 4000, 1900, 1024]
GLOBAL_BATCH, LR = 32, 1e-4
WARMUP_STEPS = 3  # not timed: the first compiles the update, the next fill the allocators
LOSS_RTOL = 1e-5  # shardadam at W ranks against one process: float rounding only
PEAK_RTOL = 0.01  # "peak RSS set in": the first phase within 1% of the final peak
# The phases inside shardadam's step(): (column, [(object path, method name)]).
STEP_PHASES = [
    ("reduce wait", [("_reducer", "reduce"), ("_reducer", "agree")]),
    ("update", [("", "_update_shards")]),
    ("gather", [("", "_gather_params")]),
]
MB = 2**20


def make_model() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def batch(rank: int, world_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the step's global batch (the same global batch at any world size)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, WIDTHS[0], generator=gen)
    y = torch.randn(GLOBAL_BATCH, WIDTHS[-1], generator=gen)
    per_rank = GLOBAL_BATCH // world_size
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    return x[part], y[part]


def nbytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t  # FSDP2's DTensors: this rank's part
    return local.numel() * local.element_size()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if hasattr(opt, "memory_report"):
        return opt.memory_report()["optimizer_state"]
    inner = opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt
    return sum(
        nbytes(value)
        for state in inner.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def grad_bytes(model: nn.Module, opt: torch.optim.Optimizer, ddp_bucket_bytes: int) -> int:
    """Gradient bytes alive on this rank: autograd's ``p.grad`` plus what the optimizer or the
    wrapper keeps (shardadam: its memory_report; DDP: its buckets)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if hasattr(opt, "memory_report"):
        # Across ranks shardadam's hooks release p.grad once staged; in one process p.grad is
        # torch's own tensor or a view of the flat gradient buffer, which memory_report counts
        # already. Autograd's own gradients own their storage; a view into a flat buffer does not.
        live = sum(nbytes(g) for g in grads if g.untyped_storage().nbytes() == nbytes(g))
        report = opt.memory_report()
        kinds = ("grad_shards", "full_grad_buffers", "late_grad_buffers", "comm_buffers")
        return live + sum(report[k] for k in kinds)
    return sum(nbytes(g) for g in grads) + ddp_bucket_bytes


def build(impl: str, world_size: int):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from shardadam import ShardedAdam

    model = make_model()
    if impl.startswith("shardadam"):
        # "shardadam stage N", optionally followed by "comm=MODE", "overlap" and/or "eager"
        # (jit_compile=False: no compiler in the process, whose memory then shows apart)
        stage = 1 if "stage 1" in impl else 2
        comm = impl.split("comm=")[1].split()[0] if "comm=" in impl else "auto"
        opt = ShardedAdam(
            model.parameters(),
            learning_rate=LR,
            stage=stage,
            comm=comm,
            overlap_param_gather="overlap" in impl,
            jit_compile="eager" not in impl,
        )
        return model, opt
    if impl == "FSDP2 + AdamW":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, foreach=True)
    wrapped = DDP(model) if world_size > 1 else model
    if impl.startswith("ZeRO"):
        opt = ZeroRedundancyOptimizer(
            model.parameters(),
            optimizer_class=torch.optim.AdamW,
            lr=LR,
            weight_decay=0.0,
            fused=True,
        )
        return wrapped, opt
    fused = impl.endswith("fused")
    opt = torch.optim.AdamW(
        model.parameters(), lr=LR, weight_decay=0.0, fused=fused, foreach=not fused
    )
    return wrapped, opt


def instrument_step_phases(opt: torch.optim.Optimizer, rank: int) -> tuple[dict, list[str]]:
    """Time the phases inside shardadam's step() by wrapping the bound methods that run them.

    This is instrumentation of ShardedAdam's private methods (``_reducer.reduce``,
    ``_reducer.agree``, ``_update_shards``, ``_gather_params``), which may be renamed or moved;
    a phase whose method is missing is reported (and shown as "missing") instead of stopping
    the run. Returns the per-step seconds by phase (reset by the caller) and the missing ones.
    """
    seconds = {phase: 0.0 for phase, _ in STEP_PHASES}
    missing = []
    for phase, methods in STEP_PHASES:
        for path, name in methods:
            owner = getattr(opt, path, None) if path else opt
            method = getattr(owner, name, None)
            if not callable(method):
                where = f"{path}.{name}" if path else name
                missing.append(phase)
                if rank == 0:
                    print(
                        f"train_step.py: cannot time shardadam's '{phase}': "
                        f"{type(opt).__name__} has no method {where} (a private method this "
                        "benchmark wraps; renamed or moved?); that column shows 'missing'",
                        file=sys.stderr,
                    )
                continue
            setattr(owner, name, timed(method, seconds, phase))
    return seconds, missing


def timed(method: Callable, seconds: dict[str, float], phase: str) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds[phase] += time.perf_counter() - start

    return wrapper


def probe_s() -> float:
    a = torch.randn(1024, 1024)
    start = time.perf_counter()
    for _ in range(4):
        a @ a
    return time.perf_counter() - start


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class RssWatch:
    """The process's peak RSS at the end of each phase: its values in the first step, and
    where it came within PEAK_RTOL of its final value (the phase that set the peak; later
    steps often add a few MB of allocator growth, which would hide it)."""

    def __init__(self) -> None:
        self.rises = [("before building", max_rss_bytes())]
        self.first_step: dict[str, int] = {}

    def note(self, phase: str, step: int) -> None:
        rss = max_rss_bytes()
        if step == 0:
            self.first_step[phase] = rss
        if rss > self.rises[-1][1]:
            self.rises.append((f"{phase}, step {step + 1}" if step >= 0 else phase, rss))

    def peak_set_in(self) -> str:
        final = self.rises[-1][1]
        return next(where for where, rss in self.rises if rss >= (1 - PEAK_RTOL) * final)


def train(rank: int, world_size: int, impl: str, steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    rss = RssWatch()
    model, opt = build(impl, world_size)
    rss.note("building", -1)
    # DDP keeps gradient buckets for the life of the module, one copy of the parameters' bytes:
    # this is DDP's design, counted here, not a measurement.
    ddp_bucket_bytes = 0
    if isinstance(model, DDP):
        ddp_bucket_bytes = sum(nbytes(p) for p in model.parameters())
    phase_s, missing = {}, []
    if hasattr(opt, "memory_report"):
        phase_s, missing = instrument_step_phases(opt, rank)
    timings: dict[str, list[float]] = {
        k: [] for k in ["step", "forward", "backward", "opt", *phase_s, "rest"]
    }
    probe = probe_s()
    for step in range(steps):
        x, y = batch(rank, world_size, step)
        dist.barrier()
        for phase in phase_s:
            phase_s[phase] = 0.0
        start = time.perf_counter()
        loss = nn.functional.mse_loss(model(x), y)
        after_forward = time.perf_counter()
        rss.note("forward", step)
        loss.backward()
        after_backward = time.perf_counter()
        rss.note("backward", step)  # untimed from here to before_step
        grads_after_backward = grad_bytes(model, opt, ddp_bucket_bytes)
        before_step = time.perf_counter()
        opt.step()
        after_step = time.perf_counter()
        rss.note("step()", step)
        opt.zero_grad()
        end = time.perf_counter()
        rss.note("zero_grad()", step)
        grads_between_steps = grad_bytes(model, opt, ddp_bucket_bytes)
        if step < WARMUP_STEPS:
            continue
        opt_s = after_step - before_step
        timings["step"].append(after_backward - start + end - before_step)
        timings["forward"].append(after_forward - start)
        timings["backward"].append(after_backward - after_forward)
        timings["opt"].append(opt_s)
        for phase, seconds in phase_s.items():
            timings[phase].append(seconds)
        if phase_s and not missing:
            timings["rest"].append(opt_s - sum(phase_s.values()))
    mean_loss = torch.tensor([loss.item()])
    dist.all_reduce(mean_loss)
    return {
        "timings": timings,
        "missing": missing,
        "state_bytes": state_bytes(opt),
        "grads_after_backward": grads_after_backward,
        "grads_between_steps": grads_between_steps,
        "opt_peak": opt.memory_report().get("peak") if hasattr(opt, "memory_report") else None,
        "peak_rss": max_rss_bytes(),
        "rss_after_backward": rss.first_step["backward"],
        "rss_after_step": rss.first_step["step()"],
        "rss_peak_set_in": rss.peak_set_in(),
        "loss": mean_loss.item() / world_size,
        "probe_s": probe,
    }


def worker(rank: int, world_size: int, impl: str, steps: int, store_path: str, out: str) -> None:
    torch.set_num_threads(max(1, 2 // world_size))  # the machine's 2 cores among the ranks
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, world_size),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=600),
    )
    try:
        torch.save(train(rank, world_size, impl, steps), f"{out}.{rank}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run(impl: str, world_size: int, steps: int) -> list[dict]:
    """One run of ``impl`` in fresh processes; every rank's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(
            worker,
            args=(world_size, impl, steps, os.path.join(tmp, "store"), out),
            nprocs=world_size,
        )
        return [torch.load(f"{out}.{rank}") for rank in range(world_size)]


def label(impl: str, world_size: int) -> str:
    if world_size > 1:
        return impl
    if impl.startswith("DDP + "):
        return impl.removeprefix("DDP + ") + " (W=1: no DDP)"
    if impl.startswith("ZeRO"):
        return impl + " (W=1: no DDP)"
    return impl


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.0f}" if values else "-"


def mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


def table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_world_size(world_size: int, results: dict[str, list[list[dict]]], rounds: int) -> None:
    """``results[impl]`` holds one list of every rank's results per round."""

    def rank0(impl: str, key: str) -> list[float]:
        return [s for ranks in results[impl] for s in ranks[0]["timings"][key]]

    reference = statistics.median(rank0(REFERENCE, "step")) if REFERENCE in results else None
    steps = len(next(iter(results.values()))[0][0]["timings"]["step"]) + WARMUP_STEPS
    print(
        f"\nworld size {world_size} (gloo, {rounds} rounds x {steps} steps, the first "
        f"{WARMUP_STEPS} not timed; batch {GLOBAL_BATCH // world_size} per rank)"
    )
    rows = []
    for impl, runs in results.items():
        step_s = rank0(impl, "step")
        ratio = f"{reference / statistics.median(step_s):.2f}x" if reference else "-"
        probe = statistics.median(ranks[0]["probe_s"] for ranks in runs)
        rows.append(
            [label(impl, world_size), ms(step_s), f"{min(step_s) * 1e3:.0f}", ratio]
            + [ms(rank0(impl, "opt")), f"{runs[-1][0]['loss']:.6f}", f"{probe * 1e3:.0f}"]
        )
    table(
        ["implementation", "median step ms", "best step ms", "vs DDP+fused", "step() ms"]
        + ["final loss", "CPU probe ms"],
        rows,
    )

    print(f"\nworld size {world_size}: ms per step by phase (medians; rank 0)")
    phases = [phase for phase, _ in STEP_PHASES] + ["rest"]
    rows = []
    for impl, runs in results.items():
        row = [label(impl, world_size)] + [ms(rank0(impl, k)) for k in ("forward", "backward")]
        row.append(ms(rank0(impl, "opt")))
        missing = set(runs[0][0]["missing"])
        for phase in phases:
            if phase in missing or (phase == "rest" and missing):
                row.append("missing")
            else:
                row.append(ms(rank0(impl, phase)) if phase in runs[0][0]["timings"] else "-")
        rows.append(row)
    table(
        ["implementation", "forward", "backward", "step()"]
        + [f"in step(): {phase}" for phase in phases],
        rows,
    )

    print(f"\nworld size {world_size}: MB per rank (rank 0 unless marked)")
    rows = []
    for impl, runs in results.items():
        row = [label(impl, world_size)]
        for key in ("state_bytes", "grads_after_backward", "grads_between_steps", "opt_peak"):
            row.append(mb(most(runs, key)))
        row += [mb(most(runs, "peak_rss")), mb(most(runs, "peak_rss", every_rank=True))]
        row += [mb(most(runs, "rss_after_backward")), mb(most(runs, "rss_after_step"))]
        row.append(" / ".join(ranks[0]["rss_peak_set_in"] for ranks in runs))
        rows.append(row)
    table(
        ["implementation", "optimizer state", "grads after backward", "grads between steps"]
        + ["optimizer peak", "peak RSS", "peak RSS, max over ranks"]
        + ["peak RSS after 1st backward", "peak RSS after 1st step()"]
        + ["peak RSS set in (within 1%)"],
        rows,
    )


def most(runs: list[list[dict]], key: str, every_rank: bool = False) -> int | None:
    """The largest value of ``key`` over the rounds, of rank 0 or of every rank."""
    values = [r[key] for ranks in runs for r in (ranks if every_rank else ranks[:1])]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def print_loss_agreement(losses: dict[int, dict[str, float]]) -> None:
    """One line per world size: shardadam's final losses against world size 1's (float
    rounding only), the others' against shardadam's at world size 1 (Adam's epsilon)."""
    print(f"\nfinal losses against world size 1's (relative difference; shardadam: < {LOSS_RTOL})")
    one = losses.get(1, {})
    for world_size, by_impl in losses.items():
        parts = []
        for impl, loss in by_impl.items():
            if not impl.startswith("shardadam") or world_size == 1:
                continue
            if impl not in one:
                parts.append(f"{impl}: no W=1 run")
                continue
            diff = abs(loss - one[impl]) / abs(one[impl])
            parts.append(f"{impl} {diff:.1e} ({'agrees' if diff < LOSS_RTOL else 'DIFFERS'})")
        anchor = next((k for k in one if k.startswith("shardadam")), None)
        if anchor is not None:
            peers = [
                f"{k} {abs(v - one[anchor]) / abs(one[anchor]):.1e}"
                for k, v in by_impl.items()
                if not k.startswith("shardadam")
            ]
            if peers:
                parts.append(f"others against {anchor} at W=1: " + ", ".join(peers))
        print(f"W={world_size}: " + ("; ".join(parts) if parts else "nothing to compare"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--impls", nargs="+", default=IMPLS)
    args = parser.parse_args()
    for world_size in args.world_sizes:
        if world_size < 1 or GLOBAL_BATCH % world_size:
            parser.error(
                f"--world-sizes: {world_size} does not divide the global batch of {GLOBAL_BATCH}"
            )
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps: {args.steps} (expected more than the {WARMUP_STEPS} untimed)")
    numel = sum(p.numel() for p in make_model().parameters())
    print(
        f"model: {numel / 1e6:.1f}M parameters, widths {WIDTHS}, global batch {GLOBAL_BATCH} "
        "split across the ranks"
    )
    losses: dict[int, dict[str, float]] = {}
    for world_size in args.world_sizes:
        results: dict[str, list[list[dict]]] = {impl: [] for impl in args.impls}
        for _ in range(args.rounds):
            for impl in args.impls:
                results[impl].append(run(impl, world_size, args.steps))
        print_world_size(world_size, results, args.rounds)
        losses[world_size] = {impl: runs[-1][0]["loss"] for impl, runs in results.items()}
    print_loss_agreement(losses)


if __name__ == "__main__":
    main()
