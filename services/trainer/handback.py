"""A stopping trainer hands its run back instead of losing it.

On SIGTERM (a redeploy, `docker compose stop`, a Kubernetes rollout, `xrayq up` stopping) Celery's
main process starts its warm shutdown and waits for the running task; the run's process learns of it
here. The run stops at its next step, abandoning the epoch in progress, goes back to `queued` with its
last epoch's checkpoint, and is published again: the next trainer continues it. A second SIGTERM, or one
while no run is in hand, ends the process as before.

The main process tells its pool process with SIGUSR2, which only ever asks for the hand-back: a SIGTERM
to the whole process group reaches the pool process too, and the two together must not count as two.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

_stop = threading.Event()
_running = threading.Event()
HANDBACK_SIGNAL = signal.SIGUSR2  # from Celery's main process to its pool process


class RunHandedBack(Exception):
    """Raised out of the training loop: the trainer is stopping and gives its run back."""


def check_handback() -> None:
    """Raise `RunHandedBack` if this process was asked to stop while holding a run."""
    if _stop.is_set():
        raise RunHandedBack


@contextmanager
def holding_a_run() -> Iterator[None]:
    """While inside, the first SIGTERM hands the run back rather than ending the process."""
    _running.set()
    try:
        yield
    finally:
        _running.clear()


def hand_back_on_sigterm() -> None:
    """In the process that runs the task (Celery's pool process)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(HANDBACK_SIGNAL, _on_handback_signal)


def _on_handback_signal(_signum: int, _frame: object) -> None:
    if _running.is_set():
        _stop.set()


def _on_sigterm(signum: int, _frame: object) -> None:
    if _running.is_set() and not _stop.is_set():
        _stop.set()
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def forward_stop_to_pool() -> None:
    """In Celery's main process, as its shutdown begins: tell the pool processes (SIGTERM reaches only
    the main process under Docker, Kubernetes and `xrayq up`)."""
    from billiard.process import active_children

    for child in active_children():
        if child.pid:
            with suppress(ProcessLookupError):
                os.kill(child.pid, HANDBACK_SIGNAL)
