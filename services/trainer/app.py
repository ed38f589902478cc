"""The trainer: a Celery app consuming queue `train`, one run at a time (`xrayq trainer`)."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from celery.signals import setup_logging, worker_process_init, worker_shutting_down

from services.trainer import metrics
from services.trainer.handback import forward_stop_to_pool, hand_back_on_sigterm, holding_a_run
from services.trainer.runs import execute_run
from shared.core import log_context
from shared.core.logs import configure_logging
from shared.core.queue import TRAIN_RUN_TASK, make_celery
from shared.core.settings import get_settings
from shared.core.tracing import configure_tracing
from shared.db.session import database_for
from shared.training.runs import publish_run

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
    hand_back_on_sigterm()


@worker_shutting_down.connect
def _stop_runs(**_: object) -> None:
    # Warm shutdown would wait for the run to end, for hours; the run is handed back instead.
    forward_stop_to_pool()


# Acked on receipt, unlike predictions: a run lasts up to hours, and its row, not the message, is what
# survives a crash. A lost trainer's run is queued again by the reconciler and resumes from its last
# epoch's checkpoint (`trainer_lost` after XRAYQ_RUN_MAX_RESUMES); were a message ever delivered twice,
# the run is no longer `queued` and the claim does nothing.
@app.task(name=TRAIN_RUN_TASK, acks_late=False)
def train_run(run_id: str) -> dict[str, Any] | None:
    """Execute a queued training run (POST /v1/training-runs)."""
    database = database_for(settings)
    before = metrics.run_status(database, run_id)
    try:
        with log_context.bound(run_id=run_id), holding_a_run():
            return execute_run(settings, run_id, requeue=partial(publish_run, app))
    finally:
        metrics.count_finished(before, metrics.run_status(database, run_id))
        metrics.idle()
