"""PreemptionSignals in one process: it notes the signals, says so, and puts the handlers back."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from shardadam.bootstrap import DistributedContext
from shardadam.preemption import PREEMPTED_EXIT_CODE, SIGNALS, PreemptionSignals

ONE_PROCESS = DistributedContext(0, 1, 0, torch.device("cpu"))


@pytest.fixture
def own_handlers():
    """Handlers of this test's own for the signals, so that a restored one can be recognised."""
    mine = {number: (lambda *args: None) for number in SIGNALS}
    before = {number: signal.signal(number, handler) for number, handler in mine.items()}
    yield mine
    for number, handler in before.items():
        signal.signal(number, handler)


@pytest.mark.parametrize("number", SIGNALS, ids=lambda number: number.name)
def test_a_signal_is_noted_not_fatal_and_the_old_handlers_come_back(own_handlers, number):
    with PreemptionSignals(ONE_PROCESS) as preemption:
        assert not preemption.requested()
        os.kill(os.getpid(), number)  # handled in the main thread before kill returns
        assert preemption.received == number
        assert preemption.requested() and preemption.requested()  # it stays requested
        said = preemption.stopping(12, "run/checkpoints")
    assert said == (
        f"stopping after step 12 on {number.name}: its checkpoint is in run/checkpoints; "
        f"exit code {PREEMPTED_EXIT_CODE}, continue with trainer.resume=auto in the same run "
        "directory"
    )
    assert {n: signal.getsignal(n) for n in SIGNALS} == own_handlers


def test_outside_the_main_thread_no_handler_is_installed(own_handlers):
    seen = []

    def open_in_a_thread():
        with PreemptionSignals(ONE_PROCESS) as preemption:
            seen.append({n: signal.getsignal(n) for n in SIGNALS})
            seen.append(preemption.requested())

    worker = threading.Thread(target=open_in_a_thread)
    worker.start()
    worker.join()
    assert seen == [own_handlers, False]
