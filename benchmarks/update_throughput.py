"""Per-shard update throughput of every member of the family against torch's nearest optimizer.

    python benchmarks/update_throughput.py [--log2-numel 22 24] [--seconds 3] [--threads N]
        [--clock wall|cpu] [--members SGD ...] [--device cpu|cuda]

For each member of ``shardadam.FAMILY`` (Keras's arguments with the overrides of
``MEMBER_ARGUMENTS``; weight decay 0, or the member's own default: AdamW's 0.004), on one flat
fp32 shard of each size:
  - compiled: what ``ShardedOptimizer.step()`` does per buffer once the gradients are reduced:
    the rule's scalars and the engine's formed and packed for this step (and moved to the
    device as the engine moves them), then ``functional.shard_step_`` through ``UpdateRunner``
    with the member's rule, structure and slots;
  - scalars preformed: the same kernel call alone (the difference is the host work of forming
    the scalars);
  - eager (``jit_compile=False``): ``shard_step_inplace_``. It uses the gradient as scratch, so
    a fresh one is copied in before each call; that copy is timed alone and subtracted;
  - torch: the nearest ``torch.optim`` algorithm (``TORCH_PEERS``) with hyperparameters taken
    from ours, in each form this torch has for the device: fused, foreach, and the
    single-tensor loop (foreach=False, the CPU default): ``step()`` on one parameter whose
    gradient was set once. The peer is torch's fastest form. A member torch lacks (Lion,
    Ftrl, Lamb) has our compiled Adam as its peer instead.
A round calls every case in turn (the order rotating); each ratio is the peer's time over
ours within one round (a throughput ratio), reported as the median over rounds with the
interquartile range. A 2048^2 matmul before and after each member shows how fast the machine
was at the time.

A new member of the family is benchmarked with no change here (against our Adam); give it an
entry in ``TORCH_PEERS`` where torch has the algorithm (``torch.optim.Adafactor`` for
Adafactor). A rule with per-tensor statistics
(``TENSOR_STATS``: Lamb) runs the engine's statistics pass before its update, as in one process
on a shard that is one whole tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

import shardadam
from shardadam.factored import FactoredLayout
from shardadam.functional import (
    ENGINE_SCALARS,
    engine_scalars,
    host_scalar,
    shard_row_col_terms,
    shard_step_,
    shard_step_inplace_,
    shard_tensor_terms,
)
from shardadam.kernels import UpdateRunner
from shardadam.layout import build_layout
from shardadam.rule_groups import evaluated, hyperparameters_of

DTYPE = torch.float32
FACTORED_COLUMNS = 1024
"""A factored rule (Adafactor) updates one matrix of this many columns."""
MIN_ROUNDS = 15

MEMBER_ARGUMENTS: dict[str, dict[str, Any]] = {"SGD": {"momentum": 0.9}}
"""Arguments beyond Keras's defaults: SGD without momentum is a different, one-line update."""

REFERENCE_MEMBER = "Adam"
"""The peer of a member torch has no algorithm for: our own compiled form of this member."""


def _betas(hp: dict[str, Any]) -> tuple[float, float]:
    return (hp["beta_1"], hp["beta_2"])


TorchArguments = Callable[[dict[str, Any], float, float], dict[str, Any]]

TORCH_PEERS: dict[str, tuple[str, TorchArguments]] = {
    "Adam": (
        "Adam",
        lambda hp, lr, wd: dict(
            lr=lr, betas=_betas(hp), eps=hp["epsilon"], amsgrad=hp["amsgrad"], weight_decay=wd
        ),
    ),
    "AdamW": (
        "AdamW",
        lambda hp, lr, wd: dict(
            lr=lr, betas=_betas(hp), eps=hp["epsilon"], amsgrad=hp["amsgrad"], weight_decay=wd
        ),
    ),
    "SGD": (
        "SGD",
        lambda hp, lr, wd: dict(
            lr=lr, momentum=hp["momentum"], nesterov=hp["nesterov"], weight_decay=wd
        ),
    ),
    "RMSprop": (
        "RMSprop",
        lambda hp, lr, wd: dict(
            lr=lr,
            alpha=hp["rho"],
            eps=hp["epsilon"],
            momentum=hp["momentum"],
            centered=hp["centered"],
            weight_decay=wd,
        ),
    ),
    "Adagrad": (
        "Adagrad",
        lambda hp, lr, wd: dict(
            lr=lr,
            initial_accumulator_value=hp["initial_accumulator_value"],
            eps=hp["epsilon"],
            weight_decay=wd,
        ),
    ),
    "Adadelta": (
        "Adadelta",
        lambda hp, lr, wd: dict(lr=lr, rho=hp["rho"], eps=hp["epsilon"], weight_decay=wd),
    ),
    "Adamax": (
        "Adamax",
        lambda hp, lr, wd: dict(lr=lr, betas=_betas(hp), eps=hp["epsilon"], weight_decay=wd),
    ),
    "Nadam": (
        "NAdam",  # torch's momentum schedule (0.96^(0.004 t)) costs the same as Keras's
        lambda hp, lr, wd: dict(lr=lr, betas=_betas(hp), eps=hp["epsilon"], weight_decay=wd),
    ),
}
"""Member -> (torch.optim class, its arguments from our hyperparameters, learning rate and
weight decay). Only AdamW's decay is nonzero, and torch's AdamW decays as Keras does."""

TORCH_FORMS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "single-tensor": {"foreach": False},
}


@dataclasses.dataclass(frozen=True)
class Member:
    """A member of the family as its optimizer resolves it: rule, hyperparameters, rates."""

    name: str
    rule: ModuleType
    hp: dict[str, Any]
    learning_rate: float
    weight_decay: float


def resolve_member(name: str) -> Member:
    """The rule and hyperparameters the member's constructor gives its param group."""
    member = shardadam.FAMILY[name]
    probe = torch.nn.Parameter(torch.zeros(1))
    optimizer = member([probe], jit_compile=False, **MEMBER_ARGUMENTS.get(name, {}))
    group, rule = optimizer.param_groups[0], member.RULE
    hp = evaluated(rule, hyperparameters_of(rule, group))
    return Member(name, rule, hp, float(group["lr"]), float(group["weight_decay"]))


def to_device(packed: Tensor, device: torch.device) -> Tensor:
    """The packed scalars on the shard's device, moved as the engine moves them."""
    if device.type == "cuda":
        return packed.pin_memory().to(device, non_blocking=True)
    return packed.to(device)


class OurUpdate:
    """One member's per-shard update on a flat shard of ``numel`` elements (one parameter),
    called as the engine calls it (``updates.ShardUpdater``) for a buffer without decay
    exclusions, EMA, masters or missing gradients."""

    def __init__(self, member: Member, numel: int, device: torch.device, jit: bool) -> None:
        self.member, self.device = member, device
        rule, hp = member.rule, member.hp
        self.runner = UpdateRunner(jit_compile=jit, announce=False)
        self.static = rule.static(hp)
        self.param = torch.randn(numel, device=device)
        self.grad = torch.randn(numel, device=device)
        self.fresh_grad = None if jit else self.grad.clone()
        self.slots = tuple(
            torch.full((numel,), value, dtype=DTYPE, device=device)
            for value in rule.slots(hp).values()
        )
        self.carry = {
            k: torch.tensor(v, dtype=DTYPE) for k, v in getattr(rule, "CARRY", {}).items()
        }
        self.step = 0
        self.factored = None
        if hasattr(rule, "FACTORED_SLOTS"):  # a factored rule: one matrix of FACTORED_COLUMNS
            shape = (numel // FACTORED_COLUMNS, FACTORED_COLUMNS)
            self.factored = FactoredLayout(build_layout([shape], ["w"], 1, 1), 0, device)
            self.rows_columns = (
                torch.zeros(self.factored.numel["rows"], dtype=DTYPE, device=device),
                torch.zeros(self.factored.numel["columns"], dtype=DTYPE, device=device),
            )
        self.preformed = self.scalars()

    def scalars(self) -> tuple[Tensor, Tensor]:
        """This step's packed scalars, on the host and on the device (``ShardUpdater.scalars``
        for one buffer)."""
        self.step += 1
        rule, lr = self.member.rule, host_scalar(self.member.learning_rate, DTYPE)
        if self.carry:
            own, self.carry = rule.scalars(self.member.hp, lr, self.step, DTYPE, self.carry)
        else:
            own = rule.scalars(self.member.hp, lr, self.step, DTYPE)
        packed = torch.cat([own, engine_scalars(lr, self.member.weight_decay, dtype=DTYPE)])
        return packed, to_device(packed, self.device)

    def __call__(self, preformed: bool = False) -> None:
        host_scalars, device_scalars = self.preformed if preformed else self.scalars()
        if self.fresh_grad is not None:
            self.grad.copy_(self.fresh_grad)  # the eager form leaves garbage in it
        rule = self.member.rule
        args = (
            rule, self.static, self.param, self.grad, self.slots, None, None, None, None,
            device_scalars,
        )  # fmt: skip
        factors = (self.tensor_factors(args),) if hasattr(rule, "TENSOR_STATS") else ()
        if self.factored is not None:
            factors = (torch.cat([self.pre_factors, factors[0]]),)
        eager = functools.partial(shard_step_inplace_, host_scalars=host_scalars, grad_scale=None)
        self.runner(shard_step_, eager, *args, *factors)

    def tensor_factors(self, args: tuple) -> Tensor:
        """What the engine does before a per-tensor rule's update (Note [per-tensor statistics]
        in ``functional``; ``ShardUpdater._tensor_factors``) where the shard is one whole
        tensor: the rule's terms summed over it (no all-reduce in one process), its factors,
        and those written out for each element (``TensorStatistics.per_element``)."""
        rule, static, param, grad, slots, _, master, decay_mask, grad_mask, scalars = args
        inputs = (rule, static, param, grad, slots, master, decay_mask, grad_mask, scalars)
        extra = ()
        if self.factored is not None:
            self.pre_factors = self.factored_factors(inputs)
            extra = (self.pre_factors,)
        terms = self.runner(shard_tensor_terms, shard_tensor_terms, *inputs, *extra)
        sums = terms.sum(1, keepdim=True)
        per_tensor = rule.tensor_factors(
            sums, sums.new_tensor([float(param.numel())]), scalars[:-ENGINE_SCALARS], static
        )
        factors = per_tensor.new_zeros(per_tensor.shape[0], param.numel())
        factors[:, :] = per_tensor.expand(-1, param.numel())
        return factors

    def factored_factors(self, inputs: tuple) -> Tensor:
        """What the engine does first for a factored rule (``ShardUpdater._factored_factors``)
        where the shard is one whole matrix: its rows and columns advanced from the rule's
        terms, then each element's estimate and the mask of factored elements."""
        rule, static, scalars, layout = inputs[0], inputs[1], inputs[-1], self.factored
        terms = self.runner(shard_row_col_terms, shard_row_col_terms, *inputs)
        row_means, col_means = layout.means(*layout.row_col_sums(terms))
        own = scalars[:-ENGINE_SCALARS]
        r, c = rule.factored_state(*self.rows_columns, row_means, col_means, own, static)
        rows, columns = rule.factored_values(
            r, c, layout.per_row(layout.matrix_sums(r)), own, static
        )
        self.rows_columns = (r, c)
        estimate = layout.outer(rows, columns, out=torch.empty(r.numel() * FACTORED_COLUMNS))
        return torch.stack([estimate, layout.mask(estimate.numel(), estimate.dtype)])


def torch_step(
    member: Member, form: str, numel: int, device: torch.device
) -> Callable[[], Any] | None:
    """``step`` of torch's peer of ``member`` in ``form``; None where torch lacks the form."""
    class_name, arguments = TORCH_PEERS[member.name]
    param = torch.nn.Parameter(torch.randn(numel, device=device))
    param.grad = torch.randn(numel, device=device)
    kwargs = arguments(member.hp, member.learning_rate, member.weight_decay)
    try:
        optimizer = getattr(torch.optim, class_name)([param], **kwargs, **TORCH_FORMS[form])
        optimizer.step()  # a form the device lacks may only fail here
    except (TypeError, RuntimeError, ValueError):
        return None
    return optimizer.step


def probe_s() -> float:
    a = torch.randn(2048, 2048)
    start = time.perf_counter()
    a @ a
    return time.perf_counter() - start


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            names = [
                line.split(":", 1)[1].strip() for line in file if line.startswith("model name")
            ]
    except OSError:
        names = []
    return f"{len(names)} x {names[0]}" if names else platform.processor() or "unknown CPU"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SAMPLE_S = 2e-4
"""At least how long one sample of a case runs: a single call on a shard of a million elements
and more, whose data a second call would find partly in the cache (Note [cold samples])."""


def time_interleaved(
    cases: dict[str, Callable[[], Any]],
    seconds: float,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each case, one sample per round.

    A round takes one sample of every case in turn, so that the samples of a round see the
    machine in one state: others' processes on these cores come and go within a second,
    faster than rounds of many calls could follow. Rounds go on for ``seconds`` (at least
    ``MIN_ROUNDS``). ``clock``: the wall clock, or this thread's CPU time (``--clock cpu``),
    which leaves out the time others' processes hold this core, for a single-threaded run.

    Note [cold samples]: a shard of 2^22 fp32 elements and its slots (48-64 MB) do not fit the
    L3 cache (32 MB here), but a call finds up to 32 MB of them there if the same case ran
    just before; a step of training finds none, forward and backward having run since. So a
    sample of a large shard is one call, and the order rotates by one case per round
    (alternating it would run the last case twice in a row at each turn): between two calls
    of a case the others' data pass through the cache.
    """

    def timed(run: Callable[[], Any], calls: int) -> float:
        synchronize(device)
        start = clock()
        for _ in range(calls):
            run()
        synchronize(device)
        return (clock() - start) / calls

    for run in cases.values():  # compile, allocate, fault pages in; then past the first slow calls
        run()
        timed(run, 3)
    calls = {name: max(1, math.ceil(SAMPLE_S / timed(run, 3))) for name, run in cases.items()}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    start = time.perf_counter()
    while len(samples[next(iter(cases))]) < MIN_ROUNDS or time.perf_counter() - start < seconds:
        first = len(samples[next(iter(cases))]) % len(cases)
        names = list(cases)[first:] + list(cases)[:first]
        for name in names:
            samples[name].append(timed(cases[name], calls[name]))
    return samples


@dataclasses.dataclass
class Row:
    """One member at one size: ratios are the peer's time over ours, one per round."""

    member: str
    numel: int
    peer: str
    ours_ms: float
    peer_ms: float
    compiled: list[float]
    preformed: list[float]
    eager: list[float]
    torch_forms_ms: dict[str, float | None]
    probe_ms: tuple[float, float]


def benchmark_member(
    member: Member,
    reference: Member,
    numel: int,
    device: torch.device,
    seconds: float,
    clock: Callable[[], float],
) -> Row:
    # Each case its own tensors: Note [cold samples].
    preformed = OurUpdate(member, numel, device, jit=True)
    fresh_grad, grad = torch.randn(numel, device=device), torch.empty(numel, device=device)
    cases: dict[str, Callable[[], Any]] = {
        "compiled": OurUpdate(member, numel, device, jit=True),
        "preformed": functools.partial(preformed, preformed=True),
        "eager": OurUpdate(member, numel, device, jit=False),
        "refresh": functools.partial(grad.copy_, fresh_grad),  # the eager case's copy, alone
    }
    steps = {}
    if member.name in TORCH_PEERS:
        steps = {form: torch_step(member, form, numel, device) for form in TORCH_FORMS}
        cases.update({f"torch {form}": step for form, step in steps.items() if step is not None})
    else:
        cases[f"ours {reference.name}"] = OurUpdate(reference, numel, device, jit=True)
    before = probe_s()
    samples = time_interleaved(cases, seconds, device, clock)
    probe_ms = (before * 1e3, probe_s() * 1e3)
    median = {name: statistics.median(s) for name, s in samples.items()}
    peer = min((n for n in samples if n.startswith(("torch", "ours"))), key=median.__getitem__)
    eager_net = [e - g for e, g in zip(samples["eager"], samples["refresh"])]

    def ratios(ours: list[float]) -> list[float]:
        return [p / o for p, o in zip(samples[peer], ours)]

    forms = {form: median.get(f"torch {form}") for form in TORCH_FORMS} if steps else {}
    return Row(
        member.name, numel, peer, median["compiled"] * 1e3, median[peer] * 1e3,
        ratios(samples["compiled"]), ratios(samples["preformed"]), ratios(eager_net),
        forms, probe_ms,
    )  # fmt: skip


@dataclasses.dataclass
class Summary:
    """A row of the table: each ratio as (median, low, high)."""

    member: str
    numel: int
    peer: str
    compiled: tuple[float, float, float]
    preformed: tuple[float, float, float]
    eager: tuple[float, float, float]
    rounds: int
    ours_ms: float
    peer_ms: float
    torch_forms_ms: dict[str, float | None]
    probe_ms: tuple[float, float]


def summarize_run(row: Row) -> Summary:
    """One process: the median over rounds and the interquartile range."""

    def quartiles(ratios: list[float]) -> tuple[float, float, float]:
        low, mid, high = statistics.quantiles(ratios, n=4)
        return (mid, low, high)

    return Summary(
        row.member, row.numel, row.peer, quartiles(row.compiled), quartiles(row.preformed),
        quartiles(row.eager), len(row.compiled), row.ours_ms, row.peer_ms, row.torch_forms_ms,
        (min(row.probe_ms), max(row.probe_ms)),
    )  # fmt: skip


def summarize_runs(rows: list[Row]) -> Summary:
    """Several processes: the median of their medians and the range of those."""

    def spread(ratios: list[list[float]]) -> tuple[float, float, float]:
        medians = [statistics.median(r) for r in ratios]
        return (statistics.median(medians), min(medians), max(medians))

    peers = [row.peer for row in rows]
    forms = {
        form: None if None in times else statistics.median(times)
        for form in rows[0].torch_forms_ms
        for times in [[row.torch_forms_ms[form] for row in rows]]
    }
    probes = [ms for row in rows for ms in row.probe_ms]
    return Summary(
        rows[0].member, rows[0].numel, max(set(peers), key=peers.count),
        spread([r.compiled for r in rows]), spread([r.preformed for r in rows]),
        spread([r.eager for r in rows]), sum(len(r.compiled) for r in rows),
        statistics.median(r.ours_ms for r in rows), statistics.median(r.peer_ms for r in rows),
        forms, (min(probes), max(probes)),
    )  # fmt: skip


def describe(ratio: tuple[float, float, float]) -> str:
    return f"{ratio[0]:.2f}x ({ratio[1]:.2f}-{ratio[2]:.2f})"


def print_table(rows: list[Summary], target: float) -> None:
    print(
        "| member | elements | peer (fastest) | compiled vs peer | scalars preformed "
        "| eager, net of refresh | rounds | ours ms | peer ms "
        "| torch fused / foreach / single-tensor ms | probe ms |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        forms = " / ".join(
            "-" if t is None else f"{t * 1e3:.2f}" for t in row.torch_forms_ms.values()
        )
        under = row.peer.startswith("torch") and row.compiled[0] < target
        print(
            f"| {row.member} | 2^{int(math.log2(row.numel))} | {row.peer} "
            f"| {describe(row.compiled)}{' **under**' if under else ''} "
            f"| {describe(row.preformed)} | {describe(row.eager)} | {row.rounds} "
            f"| {row.ours_ms:.2f} | {row.peer_ms:.2f} | {forms or 'none in torch'} "
            f"| {row.probe_ms[0]:.0f}-{row.probe_ms[1]:.0f} |"
        )


def run_in_fresh_processes(runs: int) -> list[Summary]:
    """This benchmark ``runs`` times, each in a process of its own: a process's allocations
    land in other memory, which moved a ratio by up to 15% from one process to the next."""
    results: list[list[Row]] = []
    for run in range(runs):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "rows.json")
            argv = [sys.executable, __file__, *sys.argv[1:], "--runs", "1", "--json-out", path]
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            with open(path) as file:
                results.append([Row(**row) for row in json.load(file)])
        print(f"run {run + 1}/{runs}: done", file=sys.stderr, flush=True)
    return [summarize_runs(list(same)) for same in zip(*results)]


def benchmark(args: argparse.Namespace, clock: Callable[[], float]) -> list[Row]:
    device = torch.device(args.device)
    reference = resolve_member(REFERENCE_MEMBER)
    members = [resolve_member(name) for name in args.members]
    rows = []
    for log2_numel in args.log2_numel:
        for member in members:
            rows.append(
                benchmark_member(member, reference, 2**log2_numel, device, args.seconds, clock)
            )
            print(f"{member.name} 2^{log2_numel}: done", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-numel", type=int, nargs="+", default=[22, 24])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed per member and size")
    parser.add_argument("--runs", type=int, default=1, help="fresh processes (medians combined)")
    parser.add_argument("--members", nargs="+", default=list(shardadam.FAMILY))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument("--target", type=float, default=0.9, help="compiled vs torch's fastest")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this thread's CPU time, for --threads 1 on a CPU shared with others",
    )
    parser.add_argument("--json-out", help=argparse.SUPPRESS)  # a run of --runs
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter
    if args.clock == "cpu":
        if args.device != "cpu" or torch.get_num_threads() != 1:
            parser.error("--clock cpu times one thread on the CPU: give --threads 1")
        clock = time.thread_time
    start = time.perf_counter()
    if args.runs > 1:
        table = run_in_fresh_processes(args.runs)
        spread = f"median of {args.runs} processes' medians (their range)"
    else:
        rows = benchmark(args, clock)
        if args.json_out:
            with open(args.json_out, "w") as file:
                json.dump([dataclasses.asdict(row) for row in rows], file)
            return
        table = [summarize_run(row) for row in rows]
        spread = "median over rounds (interquartile range)"
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"torch {torch.__version__}, {args.device} ({where}), "
        f"{torch.get_num_threads()} threads, {args.clock} clock, fp32; "
        f"{time.perf_counter() - start:.0f} s"
    )
    print(
        f"ratios: the peer's time over ours (throughput) in each round, {spread}; "
        "probe: a 2048^2 matmul before and after each member (ms)"
    )
    print_table(table, args.target)


if __name__ == "__main__":
    main()
