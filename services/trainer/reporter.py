"""A training run's progress, history and heartbeat, written to its row as the run goes."""

from __future__ import annotations

import time
from typing import Any

from services.trainer import metrics
from services.trainer.training import ProgressCallback
from shared.db.session import Database
from shared.training.runs import record_progress


class RunCancelled(Exception):
    pass


class RunReporter:
    """Turns training events into the run's progress, history and heartbeat, a few seconds apart.

    Each write also reads the cancellation flag; a requested cancellation raises `RunCancelled` out
    of the training loop. A `listener` (the command line's progress printer) sees every event too.
    """

    def __init__(
        self, database: Database, run_id: str, interval_s: float, listener: ProgressCallback | None = None
    ) -> None:
        self.database = database
        self.run_id = run_id
        self.interval_s = interval_s
        self.listener = listener
        self.history: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.training_started: float | None = None
        self._last_write = 0.0
        self._last_progress: dict[str, Any] = {"phase": "loading"}

    def phase(self, phase: str, **values: Any) -> None:
        self._write({"phase": phase, **values}, force=True)

    def beat(self, *_: object) -> None:
        """The heartbeat alone (progress unchanged), during long steps without progress of their own."""
        self._write(dict(self._last_progress), force=False, moved=False)

    def loading(self, done: int, total: int) -> None:
        self._write({"phase": "loading", "step": done, "steps": total, "percent": 0.0}, force=done == total)

    def data_loaded(self, train: int, val: int, classes: list[str], counts: dict[str, int]) -> None:
        if self.listener is not None:
            self.listener(
                {
                    "event": "data",
                    "train": train,
                    "val": val,
                    "classes": classes,
                    "counts": counts,
                    "load_seconds": round(time.monotonic() - self.started, 2),
                }
            )

    def on_training_event(self, event: dict[str, Any]) -> None:
        if self.listener is not None:
            self.listener(event)
        if self.training_started is None:
            self.training_started = time.monotonic()
        if event["event"] == "epoch":
            self.history.append({k: v for k, v in event.items() if k not in ("event", "epochs")})
        epochs = event["epochs"]
        if event["event"] == "step":
            done = (event["epoch"] - 1 + event["step"] / event["steps"]) / epochs
        else:
            done = event["epoch"] / epochs
        elapsed = time.monotonic() - self.training_started
        progress = {
            "phase": "training",
            "epoch": event["epoch"],
            "epochs": epochs,
            "step": event.get("step"),
            "steps": event.get("steps"),
            "percent": round(100 * done, 1),
            "eta_seconds": round(elapsed / done * (1 - done), 1) if done > 0 else None,
        }
        self._write(progress, force=event["event"] == "epoch")

    def _write(self, progress: dict[str, Any], force: bool, moved: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < self.interval_s:
            return
        if moved:
            metrics.progressed(progress)
        self._last_write = now
        self._last_progress = progress
        progress["elapsed_seconds"] = round(now - self.started, 1)
        with self.database.session() as session:
            cancel = record_progress(session, self.run_id, progress, list(self.history))
        if cancel:
            raise RunCancelled
