"""Housekeeping for training runs, run by each gateway beside the jobs' reconciler: a run whose
trainer died is queued again to resume from its checkpoint (failed `trainer_lost` once its resume
budget is spent), a queued run whose message was lost is published again."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from shared.core.queue import TRAIN_QUEUE, queue_depths
from shared.core.settings import Settings
from shared.core.storage import make_object_store
from shared.db.models import RunStatus, TrainingRun
from shared.db.session import Database
from shared.training.checkpoints import discard_checkpoint
from shared.training.runs import publish_run, queued_runs_older_than, recover_lost_runs

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


def reconcile_runs(settings: Settings, database: Database, celery: Celery) -> dict[str, int]:
    """Requeue (or, past the budget, fail) runs whose trainer died, and publish again queued runs whose
    message was lost.

    A queued run is only presumed lost while the `train` queue is empty: one trainer works through
    runs one at a time, so a run may legitimately wait behind another for hours.
    """
    with database.session() as session:
        requeued, failed = recover_lost_runs(session, settings)
    for run_id in requeued:
        publish_run(celery, run_id)  # a failed publish leaves it queued: the check below publishes it later
    if failed:
        store = make_object_store(settings)
        for run_id in failed:
            discard_checkpoint(store, run_id)
    try:
        queue_empty = queue_depths(settings).get(TRAIN_QUEUE, 0) == 0
    except Exception:
        return {"failed": len(failed), "resumed": len(requeued), "republished": 0}
    republished = 0
    if queue_empty:
        with database.session() as session:
            waiting = queued_runs_older_than(session, settings.requeue_after_s)
            running = session.scalar(select(func.count()).where(TrainingRun.status == RunStatus.running)) or 0
        # With a run in progress, queued ones may be waiting their turn in the trainer's own hands.
        if not running:
            for run_id in waiting:
                republished += publish_run(celery, run_id)
    if republished:
        log.warning("reconciler: republished %d training runs whose messages were lost", republished)
    return {"failed": len(failed), "resumed": len(requeued), "republished": republished}
