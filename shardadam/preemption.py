"""Stopping a run cleanly when the scheduler is about to end it.

Slurm sends a signal some time before it ends a job when asked (``#SBATCH --signal=USR1@120``,
see ``launch/slurm.sbatch``), and SIGTERM when it preempts, cancels or times out a job (then
SIGKILL after KillWait, 30 s by default); torchrun passes SIGTERM on to its workers. The app
then saves a checkpoint at the step it has reached and exits with :data:`PREEMPTED_EXIT_CODE`,
which tells the batch script to requeue the job; the requeued job resumes
(``trainer.resume=auto``).

A signal may reach one rank only, or the ranks at different steps: so the ranks agree, once
per step, on whether any has received one (:meth:`PreemptionSignals.requested`), and all stop
after the same step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from .bootstrap import DistributedContext

# EX_TEMPFAIL of sysexits.h, "try again later": launch/slurm.sbatch requeues the job on it.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionSignals:
    """Notes SIGUSR1 and SIGTERM instead of dying of them, while open (a context manager; it
    puts the previous handlers back when closed).

    Python can install signal handlers only in the main thread: opened in another thread, it
    installs none, and the signals do what they did before.
    """

    def __init__(self, ctx: DistributedContext) -> None:
        self.ctx = ctx
        self.received: signal.Signals | None = None  # the last one this process got
        self.agreed: signal.Signals | None = None  # the highest any rank got, by requested()
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> PreemptionSignals:
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Put back the handlers that were there before."""
        while self._previous:
            number, handler = self._previous.popitem()
            signal.signal(number, handler)

    def _note(self, number: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(number)

    def requested(self) -> bool:
        """Collective (one all_reduce of one element per signal): whether any rank has
        received one of the signals; every rank gets the same answer."""
        flags = torch.tensor(self.flags(), dtype=torch.float64, device=self.ctx.device)
        if dist.is_initialized() and self.ctx.world_size > 1:
            dist.all_reduce(flags)
        return self.agree(flags.tolist())

    def flags(self) -> list[float]:
        """This rank's part of the agreement, one element per signal in SIGNALS (1: the last
        signal this process received), to be summed over the ranks: the training loop sends
        them with the step's loss, in the one small all_reduce it makes anyway."""
        return [float(self.received == number) for number in SIGNALS]

    def agree(self, summed: list[float]) -> bool:
        """Whether any rank received a signal, from ``flags()`` summed over the ranks; the
        highest such signal is ``agreed``."""
        got = [number for number, count in zip(SIGNALS, summed) if count > 0]
        self.agreed = max(got) if got else None
        return self.agreed is not None

    def stopping(self, step: int, checkpoint_dir: object) -> str:
        """What the app says before it exits with PREEMPTED_EXIT_CODE after ``step``."""
        by = self.agreed.name if self.agreed else "a signal"
        by += "" if self.received == self.agreed else " to another rank"
        return (
            f"stopping after step {step} on {by}: its checkpoint is in {checkpoint_dir}; "
            f"exit code {PREEMPTED_EXIT_CODE}, continue with trainer.resume=auto in the same "
            "run directory"
        )
