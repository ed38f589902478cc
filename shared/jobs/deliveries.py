"""Finishing batches: seal stable studies, build each finished study's SR, send results out.

Run periodically by every gateway (`finish_pass`). The database is the truth and every step is safe
to repeat or to run in several gateways at once: sealing is one conditional UPDATE; a result is
recorded only by the pass that flips `result_pending` (the SR's UIDs and storage key are fixed by the
batch id, so a concurrent rebuild writes the same object); a due delivery is claimed with a lease and
sent in the background by `shared.jobs.dispatch`, isolated per destination and organisation. Failed
deliveries are retried with doubling pauses up to `delivery_attempts`, then marked failed -- visible
on the batch, never silently dropped.
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

import pydicom
from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session, selectinload

from shared.core.settings import Settings
from shared.core.storage import ObjectNotFound, ObjectStore
from shared.db.models import Batch, Job, JobStatus, utcnow
from shared.db.session import Database
from shared.imaging.reports import ClassifiedInstance, build_report
from shared.jobs.dispatch import DeliveryDispatcher
from shared.jobs.sr_destinations import choose_sr_deliveries
from shared.jobs.studies import seal_stable_studies

log = logging.getLogger(__name__)
SR_MEDIA_TYPE = "application/dicom"


def finish_pass(settings: Settings, database: Database, store: ObjectStore, limit: int = 50) -> int:
    """Seal, complete and deliver what is due; returns how many batches were completed."""
    with database.session() as session:
        sealed = seal_stable_studies(session, settings)
    if sealed:
        log.info("sealed %d stable studies", sealed)
    completed = sum(complete_batch(settings, database, store, batch_id) for batch_id in _ready(database, limit))
    deliver_due(settings, database, store)
    return completed


def _ready(database: Database, limit: int) -> list[str]:
    """Batches awaiting a result whose jobs are all finished (and, for a study, that is stable)."""
    unfinished = exists().where(Job.batch_id == Batch.id, Job.status.in_([JobStatus.queued, JobStatus.running]))
    with database.session() as session:
        return list(
            session.scalars(
                select(Batch.id)
                .where(
                    Batch.result_pending.is_(True),
                    or_(Batch.study_instance_uid.is_(None), Batch.stable_at.is_not(None)),
                    ~unfinished,
                )
                .order_by(Batch.created_at)
                .limit(limit)
            )
        )


def complete_batch(settings: Settings, database: Database, store: ObjectStore, batch_id: str) -> bool:
    """Build the batch's result and schedule its deliveries; False if another pass got there first."""
    with database.session() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or not batch.result_pending:
            return False
        report_key = report_uid = None
        if batch.study_instance_uid is not None:
            instances = _classified_instances(session, store, batch_id)
            if instances:
                data, report_uid = build_report(batch_id, instances)
                report_key = f"reports/{batch_id}.dcm"
                store.put(report_key, data, SR_MEDIA_TYPE)
        now = utcnow()
        deliveries: dict[str, dict[str, Any]] = {}
        if report_key:
            deliveries.update(choose_sr_deliveries(session, settings, batch))
        if batch.callback_url:
            deliveries["callback"] = {"status": "pending", "attempts": 0, "target": batch.callback_url}
        won = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.result_pending.is_(True))
            .values(
                result_pending=None,
                completed_at=now,
                report_key=report_key,
                report_sop_instance_uid=report_uid,
                deliveries=deliveries or None,
                delivery_due_at=now if deliveries else None,
            )
        )
        done = bool(won.rowcount)  # type: ignore[attr-defined]
    if done:
        log.info("batch %s completed%s", batch_id, " with a structured report" if report_key else "")
    return done


def _classified_instances(session: Session, store: ObjectStore, batch_id: str) -> list[ClassifiedInstance]:
    jobs = session.scalars(
        select(Job)
        .options(selectinload(Job.model_version))
        .where(Job.batch_id == batch_id, Job.status == JobStatus.succeeded)
        .order_by(Job.position)
    )
    instances = []
    for job in jobs:
        if job.input_key is None or job.model_version is None or job.label is None:
            continue
        try:
            header = pydicom.dcmread(io.BytesIO(store.get(job.input_key)), stop_before_pixels=True)
        except ObjectNotFound:
            log.warning("input of job %s is gone; its instance is left out of the report", job.id)
            continue
        instances.append(
            ClassifiedInstance(
                header=header,
                label=job.label,
                probabilities=job.probabilities or {},
                model_name=job.model_version.name,
                model_version=job.model_version.version,
                warnings=job.warnings or [],
            )
        )
    return instances


def deliver_due(
    settings: Settings,
    database: Database,
    store: ObjectStore,
    limit: int = 50,
    dispatcher: DeliveryDispatcher | None = None,
) -> int:
    """Start the due deliveries that have a free share of this gateway's delivery pool (see
    `shared.jobs.dispatch`); returns how many batches were started. Never waits for a receiver."""
    return (dispatcher or gateway_dispatcher(settings, database, store)).dispatch_due(limit)


_dispatchers: dict[int, tuple[Database, DeliveryDispatcher]] = {}
_dispatchers_lock = threading.Lock()


def gateway_dispatcher(settings: Settings, database: Database, store: ObjectStore) -> DeliveryDispatcher:
    """This process's dispatcher for `database`: one pool, one set of shares and breakers per gateway."""
    with _dispatchers_lock:
        held = _dispatchers.get(id(database))
        if held is None or held[0] is not database:
            held = _dispatchers[id(database)] = (database, DeliveryDispatcher(settings, database, store))
        return held[1]
