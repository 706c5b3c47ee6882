"""Preemption: the stop signal (SLURM's warning before a time limit, or SIGTERM at preemption) asks the run
to checkpoint after the current step and exit for a requeue.

The handler only sets a flag; the ranks agree on it over the host group after every step, so every rank
stops after the same one. A run that stopped so leaves the ``STOPPED`` marker in its folder
(launch/slurm_job.py requeues on it); the next start removes it.
"""
from __future__ import annotations

import os
import signal

from pretrain import dist

STOPPED_MARKER = "STOPPED"
"""File in the run folder saying the last run stopped on train.stop_signal after a checkpoint (resume it)."""


class Preempted(Exception):
    """The run stopped on the preemption / time-limit signal after writing a checkpoint (and STOPPED)."""


class StopSignal:
    """The handler of ``train.stop_signal`` (a name such as USR1), installed from construction until
    :meth:`restore`: a signal during start-up or a resume stops the run at its first step."""

    def __init__(self, name: str):
        self.requested = False
        self.signal = signal.Signals[f"SIG{name}"]
        self.previous = signal.signal(self.signal, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """Whether some rank got the signal (collective, over the host group: waits on no device)."""
        return dist.all_reduce_max(float(self.requested)) > 0

    def restore(self) -> None:
        """Put the handler that was there before back."""
        signal.signal(self.signal, self.previous)


def clear_marker(run_dir: str) -> None:
    """Remove a previous run's STOPPED marker (rank 0): this start continues that stop."""
    marker = os.path.join(run_dir, STOPPED_MARKER)
    if dist.is_main() and os.path.exists(marker):
        os.remove(marker)


def stopped(run_dir: str, checkpoint: str) -> None:
    """Leave the STOPPED marker naming ``checkpoint`` (rank 0), wait for every rank and raise
    :class:`Preempted`. Collective."""
    if dist.is_main():
        with open(os.path.join(run_dir, STOPPED_MARKER), "w") as handle:
            handle.write(f"{checkpoint}\n")
    dist.barrier()
    raise Preempted(checkpoint)
