"""The example trains across ranks under torchrun, as the README shows."""

from __future__ import annotations

import re
import subprocess
import sys


def test_torchrun_two_ranks_trains_and_shards_the_state():
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "shardadam.toy",
        "--steps",
        "150",
        "--no-jit",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "ranks: 2;" in out
    first = float(re.search(r"held-out loss before training: ([0-9.]+)", out).group(1))
    ema = float(re.search(r"EMA weights: ([0-9.]+)", out).group(1))
    assert ema < 0.1 * first
    sharded = int(
        re.search(r"optimizer state on each rank: ([0-9,]+)", out).group(1).replace(",", "")
    )
    # The same model and options in one process, for the state it holds.
    import torch

    from shardadam import ShardedAdam

    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    single = ShardedAdam(model.parameters(), use_ema=True).memory_report()["optimizer_state"]
    assert single / 2 <= sharded <= single / 2 + 3 * 4 * 16 * 2  # half, within padding
