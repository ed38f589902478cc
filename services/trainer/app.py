"""The trainer: a Celery app consuming queue `train`, one run at a time (`xrayq trainer`)."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init

from services.trainer import metrics
from services.trainer.runs import execute_run
from shared.core.logs import configure_logging
from shared.core.queue import TRAIN_RUN_TASK, make_celery
from shared.core.settings import get_settings
from shared.db.session import database_for

settings = get_settings()
app = make_celery(settings, "xrayq-trainer")
log = logging.getLogger(__name__)


@worker_process_init.connect
def _init_process(**_: object) -> None:
    configure_logging(settings)
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
        return execute_run(settings, run_id)
    finally:
        metrics.count_finished(before, metrics.run_status(database, run_id))
        metrics.idle()
