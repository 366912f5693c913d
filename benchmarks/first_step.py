"""The first compiled step: how long ShardedAdam's first step() takes in a fresh process, with
the compile caches cold and then warm (issue 11: a warm first step under 1.5 s).

    python benchmarks/first_step.py [--warm-runs 5] [--compare] [--variants 2] [--default-cache]

Every measurement runs in a fresh subprocess, so that nothing cached in memory counts: a
~12M-parameter fp32 MLP on the CPU, one forward/backward, then ``opt.step()`` twice with
``ShardedAdam(model.parameters())`` (jit_compile=True), timed one by one. The first run
populates the compile caches (cold), the others find them (warm); torch's fused AdamW's first
step, also in a fresh process, is the reference. ``--compare`` also runs ShardedAdam with
inductor's defaults, without kernels.py's start-up measures (Note [vec ISA probes], Note [no
precompiled header]), interleaved round by round. ``--variants 2`` makes two parameter groups,
one with weight decay and a decay mask: two buffers, two kernel variants.

The caches are a fresh temporary ``TORCHINDUCTOR_CACHE_DIR`` (removed afterwards), so that the
first run is really cold; ``--default-cache`` uses the default locations
(/tmp/torchinductor_$USER), where the first run may already be warm.

The warm first step is broken down by sampling the main thread's stack every millisecond
(exclusive, innermost category first): imports, inductor's vector-ISA probes, hashing torch's
sources, dynamo's tracing and guards, loading the cached graph, and the rest. Medians over
the warm runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

CATEGORIES = [
    # (label, file part, function names or None for any): the first whose frame is anywhere
    # on the stack wins (dynamo's tracing is on the stack during the whole compile).
    ("vec ISA probes", "torch/_inductor/cpu_vec_isa.py", None),
    ("imports", "<frozen importlib._bootstrap", ("_find_and_load",)),
    ("hashing torch's sources (torch_key)", "torch/_inductor/codecache.py", ("torch_key",)),
    ("subprocesses (compiler version...)", "subprocess.py", None),
    (
        "loading the cached kernel",
        "torch/_inductor/codecache.py",
        (
            "load_by_key_path",
            "load_async",
            "load_pybinding_async",
        ),
    ),  # fmt: skip
    ("FX/AOTAutograd cache lookup", "torch/_functorch/_aot_autograd/autograd_cache.py", None),
    ("FX/AOTAutograd cache lookup", "torch/_inductor/codecache.py", None),
    ("inductor / AOTAutograd other", "torch/_inductor/", None),
    ("inductor / AOTAutograd other", "torch/_functorch/", None),
    ("dynamo guards", "torch/_dynamo/guards.py", None),
    ("dynamo tracing", "torch/_dynamo/symbolic_convert.py", None),
    ("dynamo other", "torch/_dynamo/", None),
]


class StackSampler:
    """Samples the calling thread's stack from another thread; each sample is weighted by the
    time since the one before, so the categories add up to the wall time."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.target = threading.get_ident()
        self.seconds: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval_s):
            frame = sys._current_frames().get(self.target)
            now = time.perf_counter()
            label = classify(frame)
            self.seconds[label] = self.seconds.get(label, 0.0) + now - last
            last = now


def classify(frame) -> str:
    stack = []
    while frame is not None:
        stack.append((frame.f_code.co_filename.replace(os.sep, "/"), frame.f_code.co_name))
        frame = frame.f_back
    for label, part, names in CATEGORIES:
        if any(part in path and (names is None or name in names) for path, name in stack):
            return label
    return "shardadam and eager torch"


def build_model(variants: int):
    import torch

    torch.manual_seed(0)
    widths = [1024, 2048, 2048, 2048, 1024]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    params = list(model.parameters())
    if variants == 1:
        groups = [{"params": params}]
    else:  # Two buffers: with a decay mask (two kinds of parameters) and without decay.
        groups = [{"params": params[:4], "weight_decay": 0.01}, {"params": params[4:]}]
    return model, groups


def make_optimizer(kind: str, model, groups):
    import torch

    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    from shardadam import ShardedAdam, kernels

    if kind == "defaults":  # what kernels.py did before its start-up measures
        kernels._remember_vec_isa_probes = lambda: None
        kernels._inductor_options = lambda: {}
    opt = ShardedAdam(groups, learning_rate=1e-3)
    if len(groups) > 1:
        opt.exclude_from_weight_decay(var_list=[p for p in groups[0]["params"] if p.ndim == 1])
    return opt


def child(kind: str, variants: int) -> dict:
    import torch

    model, groups = build_model(variants)
    opt = make_optimizer(kind, model, groups)
    x = torch.randn(64, 1024)
    times = []
    sampler = StackSampler()
    for step in range(2):
        model(x).square().mean().backward()
        began = time.perf_counter()
        if step == 0 and kind != "adamw":
            with sampler:
                opt.step()
        else:
            opt.step()
        times.append(time.perf_counter() - began)
        opt.zero_grad()
    numel = sum(p.numel() for p in model.parameters())
    result = {"numel": numel, "first_s": times[0], "second_s": times[1]}
    if kind != "adamw":
        from torch._dynamo.utils import counters

        result["counters"] = {
            "unique_graphs": counters["stats"]["unique_graphs"],
            "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
            "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
            "recompiles": sum(counters["recompiles"].values()),
        }
        result["breakdown_s"] = sampler.seconds
    return result


def run_child(kind: str, variants: int, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--variants", str(variants)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the {kind} child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


NAMES = {"shardadam": "ShardedAdam", "defaults": "ShardedAdam, inductor defaults"}


def report(cold: dict[str, dict], warm: dict[str, list[dict]], adamw: list[dict]) -> None:
    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    kinds = list(cold)
    some = cold[kinds[0]]
    print(f"{some['numel']:,} parameters, fp32, CPU; {len(adamw)} warm rounds (medians)")
    print("| run | first step s | second step s |")
    print("|---|---:|---:|")
    for kind in kinds:
        name, firsts = NAMES[kind], sorted(r["first_s"] for r in warm[kind])
        spread = f"({firsts[0]:.2f}-{firsts[-1]:.2f})"
        print(
            f"| {name}, cold cache | {cold[kind]['first_s']:.2f} | {cold[kind]['second_s']:.3f} |"
        )
        first, second = median(warm[kind], "first_s"), median(warm[kind], "second_s")
        print(f"| {name}, warm cache | {first:.2f} {spread} | {second:.3f} |")
    print(f"| fused AdamW | {median(adamw, 'first_s'):.3f} | {median(adamw, 'second_s'):.3f} |")
    for kind in kinds:
        ratios = [r["first_s"] / a["first_s"] for r, a in zip(warm[kind], adamw)]
        ratio = statistics.median(ratios)
        print(f"{NAMES[kind]}: warm first step / fused AdamW's, same round: median {ratio:.1f}x")
    if len(kinds) > 1:
        ratios = [a["first_s"] / b["first_s"] for a, b in zip(*(warm[k] for k in kinds))]
        ratio = statistics.median(ratios)
        print(f"{NAMES[kinds[0]]} / {NAMES[kinds[1]]}, warm first step, same round: {ratio:.2f}x")
    for kind in kinds:
        print(f"{NAMES[kind]}: cold {cold[kind]['counters']}, warm {warm[kind][-1]['counters']}")
    labels = sorted({label for kind in kinds for r in warm[kind] for label in r["breakdown_s"]})
    table = {
        label: [statistics.median(r["breakdown_s"].get(label, 0.0) for r in warm[k]) for k in kinds]
        for label in labels
    }
    print("warm first step, by where the main thread was (sampled; medians, s):")
    print("| part | " + " | ".join(NAMES[k] for k in kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for label, seconds in sorted(table.items(), key=lambda item: -item[1][-1]):
        print(f"| {label} | " + " | ".join(f"{s:.2f}" for s in seconds) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-runs", type=int, default=5)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--variants", type=int, choices=(1, 2), default=1)
    parser.add_argument("--default-cache", action="store_true")
    parser.add_argument("--child", choices=("shardadam", "defaults", "adamw"), help="internal")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.variants)))
        return
    kinds = ["shardadam", "defaults"] if args.compare else ["shardadam"]
    with tempfile.TemporaryDirectory(prefix="first_step_") as cache_dir:
        env = dict(os.environ)
        if not args.default_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        cold = {kind: run_child(kind, args.variants, env) for kind in kinds}
        warm: dict[str, list[dict]] = {kind: [] for kind in kinds}
        adamw = []
        for _ in range(args.warm_runs):  # interleaved: the machine's speed drifts
            for kind in kinds:
                warm[kind].append(run_child(kind, args.variants, env))
            adamw.append(run_child("adamw", args.variants, env))
    report(cold, warm, adamw)


if __name__ == "__main__":
    main()
