"""Prometheus metrics of the trainer: the run in progress and how runs end.

The run executes in a pool process of the Celery trainer (`xrayq trainer` serves the sum of its
processes on XRAYQ_TRAINER_METRICS_PORT, `shared.core.metrics_server`), so the gauges keep the value
written last by any process: a new pool process announces itself idle, over a killed one's run.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge

from shared.db.models import RunStatus, TrainingRun
from shared.db.session import Database

# The phases `RunReporter` reports (loading, training, evaluating, registering), plus idle between runs.
PHASES = ("idle", "loading", "training", "evaluating", "registering")

RUN_ACTIVE = Gauge("xrayq_training_run_active", "1 while this trainer executes a run", multiprocess_mode="mostrecent")
RUN_PHASE = Gauge(
    "xrayq_training_run_phase", "1 for the phase the trainer is in", ["phase"], multiprocess_mode="mostrecent"
)
RUN_EPOCH = Gauge("xrayq_training_run_epoch", "Epoch of the run in progress", multiprocess_mode="mostrecent")
RUN_EPOCHS = Gauge("xrayq_training_run_epochs", "Epochs the run in progress asks for", multiprocess_mode="mostrecent")
RUN_PROGRESS = Gauge(
    "xrayq_training_run_progress_ratio", "Share of the run's training done (0 to 1)", multiprocess_mode="mostrecent"
)
# When the run last moved (a step, an epoch or a phase; a heartbeat alone is not progress): what the
# `XrayqTrainingRunStuck` alert watches.
RUN_MOVED = Gauge(
    "xrayq_training_run_progress_timestamp_seconds",
    "Unix time the run in progress last made progress",
    multiprocess_mode="mostrecent",
)
RUNS_FINISHED = Counter("xrayq_training_runs_finished", "Training runs this trainer finished, by status", ["status"])

FINISHED = frozenset({RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled})


def show_phase(phase: str) -> None:
    for name in {*PHASES, phase}:
        RUN_PHASE.labels(name).set(1 if name == phase else 0)


def idle() -> None:
    RUN_ACTIVE.set(0)
    show_phase("idle")
    RUN_EPOCH.set(0)
    RUN_EPOCHS.set(0)
    RUN_PROGRESS.set(0)


def progressed(progress: dict[str, Any]) -> None:
    """A progress write of the run (`RunReporter`): its phase, epoch and share done."""
    RUN_ACTIVE.set(1)
    show_phase(str(progress.get("phase", "training")))
    if progress.get("epoch") is not None:
        RUN_EPOCH.set(progress["epoch"])
    if progress.get("epochs") is not None:
        RUN_EPOCHS.set(progress["epochs"])
    if progress.get("percent") is not None:
        RUN_PROGRESS.set(progress["percent"] / 100)
    RUN_MOVED.set(time.time())


def run_status(database: Database, run_id: str) -> RunStatus | None:
    with database.session() as session:
        run = session.get(TrainingRun, run_id)
        return run.status if run is not None else None


def count_finished(before: RunStatus | None, after: RunStatus | None) -> None:
    """Count a run this trainer ended: one that was not finished when its message arrived (a
    redelivered message for a finished run ends nothing) and is now."""
    if before not in FINISHED and after in FINISHED:
        RUNS_FINISHED.labels(after.value).inc()
