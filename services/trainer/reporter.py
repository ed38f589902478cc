"""A training run's progress, history and heartbeat, written to its row as the run goes."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from services.trainer import metrics
from services.trainer.handback import check_handback
from services.trainer.training import ProgressCallback
from shared.db.session import Database
from shared.training.runs import record_progress, touch_heartbeat

log = logging.getLogger(__name__)


class RunCancelled(Exception):
    pass


class RunReporter:
    """Turns training events into the run's progress, history and heartbeat, a few seconds apart.

    Each write also reads the cancellation flag; a requested cancellation raises `RunCancelled` out
    of the training loop, a stopping trainer `RunHandedBack`, a run no longer held by `trainer` (the
    claim) `RunNotHeld`. A `listener` (the command line's progress printer) sees every event too.
    """

    def __init__(
        self,
        database: Database,
        run_id: str,
        interval_s: float,
        listener: ProgressCallback | None = None,
        trainer: str | None = None,
    ) -> None:
        self.database = database
        self.run_id = run_id
        self.interval_s = interval_s
        self.listener = listener
        self.trainer = trainer
        self.history: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.training_started: float | None = None
        # A resumed run: the share of training its checkpoint holds (the progress goes on from there).
        self.resumed_done = 0.0
        self._last_write = 0.0
        self._last_progress: dict[str, Any] = {"phase": "loading"}
        self._closed: threading.Event | None = None  # set: the heartbeat thread stops

    def keep_alive(self) -> None:
        """Write the heartbeat from a thread of its own until `close`, so that steps without progress
        (evaluation, the out-of-distribution reference, a slow checkpoint upload, a busy machine) never
        look like a lost trainer, whose run would be taken away and resumed elsewhere."""
        if self.trainer is None:
            return
        self._closed = threading.Event()
        thread = threading.Thread(
            target=self._beat_until_closed, args=(self.trainer, self._closed), name="run-heartbeat", daemon=True
        )
        thread.start()

    def close(self) -> None:
        if self._closed is not None:
            self._closed.set()

    def _beat_until_closed(self, trainer: str, closed: threading.Event) -> None:
        while not closed.wait(max(self.interval_s, 0.2)):
            try:
                with self.database.session() as session:
                    if not touch_heartbeat(session, self.run_id, trainer):
                        return  # no longer ours: the next progress write stops the run
            except Exception:
                log.warning("training run %s: heartbeat not written", self.run_id, exc_info=True)

    def resumed(self, epoch: int, epochs: int, history: list[dict[str, Any]]) -> None:
        """The run continues after `epoch` of `epochs`, with the history of those epochs."""
        self.history = [dict(entry) for entry in history]
        self.resumed_done = epoch / epochs if epochs else 0.0

    @property
    def resumed_percent(self) -> float:
        return round(100 * self.resumed_done, 1)

    def phase(self, phase: str, **values: Any) -> None:
        self._write({"phase": phase, **values}, force=True)

    def beat(self, *_: object) -> None:
        """The heartbeat alone (progress unchanged), during long steps without progress of their own."""
        self._write(dict(self._last_progress), force=False, moved=False)

    def loading(self, done: int, total: int) -> None:
        progress = {"phase": "loading", "step": done, "steps": total, "percent": self.resumed_percent}
        self._write(progress, force=done == total)

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
        done_here = done - self.resumed_done  # by this trainer, whose pace tells the time left
        progress = {
            "phase": "training",
            "epoch": event["epoch"],
            "epochs": epochs,
            "step": event.get("step"),
            "steps": event.get("steps"),
            "percent": round(100 * done, 1),
            "eta_seconds": round(elapsed / done_here * (1 - done), 1) if done_here > 0 else None,
        }
        # An epoch's end is no place to hand back: its checkpoint, written next, keeps the epoch's work.
        epoch_end = event["event"] == "epoch"
        self._write(progress, force=epoch_end, may_hand_back=not epoch_end)

    def _write(self, progress: dict[str, Any], force: bool, moved: bool = True, may_hand_back: bool = True) -> None:
        if may_hand_back:
            check_handback()
        now = time.monotonic()
        if not force and now - self._last_write < self.interval_s:
            return
        if moved:
            metrics.progressed(progress)
        self._last_write = now
        self._last_progress = progress
        progress["elapsed_seconds"] = round(now - self.started, 1)
        with self.database.session() as session:
            cancel = record_progress(session, self.run_id, progress, list(self.history), trainer=self.trainer)
        if cancel:
            raise RunCancelled
