"""Housekeeping run by each gateway: republish jobs whose message was lost, purge old inputs, sweep
away inputs no job refers to.

A message can vanish between the two systems: the broker was down when the gateway published, or a
worker was killed after Redis handed it a message but before it was recorded as unacknowledged. The
database still says `queued` (or `running`, for a worker that died mid-chunk), so it can be sent again:
- queued jobs published before the oldest message still waiting on `predict` (each message carries
  its publish time; all of the queue when it is empty), less `requeue_after_s`: their message has
  left the queue without being claimed, so it was lost, however busy the queue is;
- running jobs claimed more than `stale_running_after_s` ago (a chunk takes seconds).
Each pass is two reads (the queue's oldest message, one query) and, if anything was lost, one publish
and one update. Republishing is safe: workers claim only queued jobs or abandoned ones, write results
only once, and count an attempt only when they take a job, so copies sent while no worker runs cost
nothing, and a job that keeps killing its worker still ends `too_many_attempts`.
Training runs get the same care in `shared/training/reconciler.py`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update

from shared.core.queue import oldest_waiting_publish_time
from shared.core.settings import Settings
from shared.db.models import Job, utcnow
from shared.db.session import Database
from shared.jobs.lifecycle import jobs_to_republish, mark_republished, publish_jobs

if TYPE_CHECKING:
    from celery import Celery

    from shared.core.storage import ObjectStore

log = logging.getLogger(__name__)


def reconcile_once(settings: Settings, database: Database, celery: Celery, limit: int = 2000) -> int:
    """One pass; returns how many jobs were republished."""
    now = utcnow()
    try:
        oldest = oldest_waiting_publish_time(settings, now.timestamp())
    except Exception:  # broker unreachable: publishing would fail too
        log.warning("reconciler: broker unreachable, trying later", exc_info=True)
        return 0
    drained_before = None if oldest is None else datetime.fromtimestamp(oldest, UTC)
    with database.session() as session:
        job_ids = jobs_to_republish(session, settings, drained_before=drained_before, limit=limit)
    if job_ids and publish_jobs(celery, job_ids, settings.predict_chunk_size):
        with database.session() as session:
            mark_republished(session, job_ids, now)
        log.warning("reconciler: republished %d jobs whose messages were lost", len(job_ids))
        return len(job_ids)
    return 0


def purge_old_inputs(settings: Settings, database: Database, limit: int = 1000) -> int:
    """Delete stored inputs of jobs finished more than `input_retention_days` ago; the results stay."""
    if settings.input_retention_days <= 0:
        return 0
    from shared.core.storage import make_object_store

    cutoff = utcnow() - timedelta(days=settings.input_retention_days)
    with database.session() as session:
        rows = session.execute(
            select(Job.id, Job.input_key).where(Job.finished_at < cutoff, Job.input_key.is_not(None)).limit(limit)
        ).all()
    store = make_object_store(settings)
    for _, key in rows:
        if key:
            store.delete(key)
    if rows:
        with database.session() as session:
            session.execute(update(Job).where(Job.id.in_([job_id for job_id, _ in rows])).values(input_key=None))
        log.info("purged the inputs of %d jobs finished before %s", len(rows), cutoff.isoformat())
    return len(rows)


# The day folders of inputs (`inputs/YYYY/MM/DD/<job id>`, shared/jobs/creation.py) the sweeper lists:
# today's and the two before, so each sweep lists a few days of inputs, not the retention's thirty.
SWEPT_DAYS = 3
# How often a gateway sweeps (the reconciler's own passes are every few seconds; a listing is not).
SWEEP_EVERY_S = 900.0


def sweep_orphaned_inputs(settings: Settings, database: Database, store: ObjectStore | None = None) -> list[str]:
    """Delete input objects that no job row refers to and that are older than `orphaned_input_grace_s`:
    a submission that failed after storing its inputs (the database refused the commit, the process
    died) leaves them behind, and nothing else would ever delete them. Returns the keys deleted."""
    if settings.orphaned_input_grace_s <= 0:
        return []
    from shared.core.storage import make_object_store

    store = store or make_object_store(settings)
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.orphaned_input_grace_s)
    deleted: list[str] = []
    for days_ago in range(SWEPT_DAYS):
        prefix = f"inputs/{now - timedelta(days=days_ago):%Y/%m/%d}/"
        old = [item.key for item in store.list_objects(prefix) if item.modified is not None and item.modified < cutoff]
        for start in range(0, len(old), 500):
            keys = old[start : start + 500]
            job_ids = [key.rsplit("/", 1)[-1] for key in keys]
            with database.session() as session:
                referred = set(session.execute(select(Job.input_key).where(Job.id.in_(job_ids))).scalars())
            for key in keys:
                if key not in referred:
                    store.delete(key)
                    deleted.append(key)
    if deleted:
        log.warning("deleted %d stored inputs that no job refers to", len(deleted))
    return deleted
