"""The trainer: a Celery app consuming queue `train`, one run at a time (`xrayq trainer`)."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import setup_logging, worker_process_init

from services.trainer import metrics
from services.trainer.runs import execute_run
from shared.core import log_context
from shared.core.logs import configure_logging
from shared.core.queue import TRAIN_RUN_TASK, make_celery
from shared.core.settings import get_settings
from shared.core.tracing import configure_tracing
from shared.db.session import database_for

settings = get_settings()
app = make_celery(settings, "xrayq-trainer")
log = logging.getLogger(__name__)


@setup_logging.connect
def _configure_main_process_logging(**_: object) -> None:
    configure_logging(settings, "trainer")  # instead of Celery's own set-up (see services/worker/app.py)


@worker_process_init.connect
def _init_process(**_: object) -> None:
    configure_logging(settings, "trainer")
    configure_tracing(settings, "trainer")
    metrics.idle()  # over whatever a killed predecessor last reported


# Acked on receipt, unlike predictions: a run lasts up to hours, and its row, not the message, is what
# survives a crash. A lost trainer's run is failed by the reconciler (`trainer_lost`); and were the
# message ever delivered again, the run is no longer `queued` and the claim does nothing.
@app.task(name=TRAIN_RUN_TASK, acks_late=False)
def train_run(run_id: str) -> dict[str, Any] | None:
    """Execute a queued training run (POST /v1/training-runs)."""
    database = database_for(settings)
    before = metrics.run_status(database, run_id)
    try:
        with log_context.bound(run_id=run_id):
            return execute_run(settings, run_id)
    finally:
        metrics.count_finished(before, metrics.run_status(database, run_id))
        metrics.idle()
