"""Preemption: Slurm's warning signal becomes a checkpoint at the next consistent point.

Slurm sends SIGUSR2 `cluster.signal_delay_s` before the time limit (and when a job is preempted
with a grace time); submitit and the node agent pass it on to the trainer. The trainer finishes
the step it is in, saves a checkpoint (weights, optimizer, data position, RNG, wandb run id) and
exits with REQUEUE_EXIT_CODE; the job is requeued and resumes from that checkpoint exactly.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNAL = signal.SIGUSR2
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" — a checkpoint is saved, requeue the job


class Preempted(Exception):
    """The trainer stopped on request after saving a checkpoint; the job should be requeued."""


class StopSignal:
    """`stop = StopSignal.install()` … `if stop.requested:` … `stop.restore()` — SIGUSR2 sets the
    flag instead of killing the process. Outside the main thread (where Python cannot take
    signals) it never fires."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    @classmethod
    def install(cls) -> "StopSignal":
        stop = cls()
        if threading.current_thread() is threading.main_thread():
            stop._previous = signal.signal(STOP_SIGNAL, stop._handle)
        return stop

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(STOP_SIGNAL, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True
