"""Liveness of the Celery processes (worker, trainer): a heartbeat file their event loop touches.

A process that is alive but stuck (its event loop blocked, its broker connection wedged) still has a
pid; what it no longer does is run its timers. So the worker's own timer touches
`home/liveness/<role>` every `liveness_interval_s`, and `xrayq healthcheck worker|trainer` (the
container's healthcheck) calls the process alive while that file is younger than three intervals. A
training run works in a pool process, so a long run does not stop the heartbeat of its trainer.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps

from shared.core.settings import Settings

# Missed beats before a process counts as hung: one late beat on a busy machine is not a death.
MISSED_BEATS = 3


def heartbeat_file(settings: Settings, role: str) -> Path:
    return settings.home.resolve() / "liveness" / role


def beat(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def heartbeat_age(path: Path) -> float | None:
    """Seconds since the last beat; None when there is none (never started, or stopped cleanly)."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None


def is_fresh(settings: Settings, role: str) -> tuple[bool, str]:
    """Whether `role`'s process beat recently enough, and a sentence saying so."""
    path = heartbeat_file(settings, role)
    age = heartbeat_age(path)
    limit = MISSED_BEATS * settings.liveness_interval_s
    if age is None:
        return False, f"no heartbeat at {path}: the {role} has not started (or has stopped)"
    if age > limit:
        return False, f"the {role}'s last heartbeat is {age:.0f} s old (limit {limit:.0f} s): it is hung"
    return True, f"the {role} beat {age:.1f} s ago"


def install_heartbeat(app: Celery, settings: Settings, role: str) -> None:
    """Make `app`'s worker touch the heartbeat file from its own timer while it runs."""
    path = heartbeat_file(settings, role)
    interval = settings.liveness_interval_s

    class Heartbeat(bootsteps.StartStopStep):
        # The worker's timer runs in its event loop: if the loop hangs, the beats stop.
        requires = {"celery.worker.components:Timer"}

        def start(self, worker: Any) -> None:
            beat(path)
            self.timer_entry = worker.timer.call_repeatedly(interval, beat, (path,), priority=10)

        def stop(self, worker: Any) -> None:
            with contextlib.suppress(AttributeError):
                self.timer_entry.cancel()
            path.unlink(missing_ok=True)  # a stopping process is not healthy any more

    app.steps["worker"].add(Heartbeat)
