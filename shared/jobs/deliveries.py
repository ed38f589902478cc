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
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import pydicom
from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.orm import Session, selectinload

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectNotFound, ObjectStore
from shared.db.models import Batch, Job, JobStatus, utcnow
from shared.db.session import Database
from shared.imaging.reports import ClassifiedInstance, build_report
from shared.jobs.dispatch import DeliveryDispatcher
from shared.jobs.sr_destinations import choose_sr_deliveries
from shared.jobs.studies import seal_stable_studies
from shared.jobs.views import COMPLETION

log = logging.getLogger(__name__)
SR_MEDIA_TYPE = "application/dicom"
T = TypeVar("T")


def finish_pass(settings: Settings, database: Database, store: ObjectStore, limit: int = 50) -> int:
    """Seal, complete and deliver what is due; returns how many batches were completed.

    Sealing, completion and delivery are independent steps: one that fails is logged and the others
    still run. Each batch's completion stands alone too -- a batch whose result cannot be made records
    why on itself (`complete_batch`) and the pass moves on to the next."""
    sealed = _guarded("sealing stable studies", partial(_seal, settings, database), 0)
    if sealed:
        log.info("sealed %d stable studies", sealed)
    completed = 0
    ready: list[str] = _guarded("finding batches to complete", partial(_ready, database, limit), [])
    for batch_id in ready:
        completed += _guarded(
            f"completing batch {batch_id}", partial(complete_batch, settings, database, store, batch_id), False
        )
    _guarded("delivering results", partial(deliver_due, settings, database, store), 0)
    return completed


def _guarded(step: str, run: Callable[[], T], fallback: T) -> T:
    """Run one step of the pass; a failure is logged, never stops the other steps."""
    try:
        return run()
    except Exception:
        log.exception("finishing pass: %s failed", step)
        return fallback


def _seal(settings: Settings, database: Database) -> int:
    with database.session() as session:
        return seal_stable_studies(session, settings)


def _ready(database: Database, limit: int) -> list[str]:
    """Batches awaiting a result whose jobs are all finished (and, for a study, that is stable); a batch
    whose completion failed waits for its retry time and comes after those that never failed."""
    unfinished = exists().where(Job.batch_id == Batch.id, Job.status.in_([JobStatus.queued, JobStatus.running]))
    retry_at = func.coalesce(Batch.deliveries[(COMPLETION, "next_at")].as_string(), "")
    with database.session() as session:
        return list(
            session.scalars(
                select(Batch.id)
                .where(
                    Batch.result_pending.is_(True),
                    or_(Batch.study_instance_uid.is_(None), Batch.stable_at.is_not(None)),
                    ~unfinished,
                    retry_at <= _timestamp(utcnow()),
                )
                .order_by(retry_at, Batch.created_at)
                .limit(limit)
            )
        )


def complete_batch(settings: Settings, database: Database, store: ObjectStore, batch_id: str) -> bool:
    """Build the batch's result and schedule its deliveries; False if another pass got there first, or
    if building it failed (recorded on the batch: retried later, or completed without a report)."""
    earlier: dict[str, Any] = {}
    try:
        with database.session() as session:
            batch = session.get(Batch, batch_id)
            if batch is None or not batch.result_pending:
                return False
            earlier = dict((batch.deliveries or {}).get(COMPLETION) or {})
            study = batch.study_instance_uid is not None
            instances = _classified_instances(session, store, batch_id) if study else []
        report_key = report_uid = None
        if instances:
            data, report_uid = build_report(batch_id, instances)
            report_key = f"reports/{batch_id}.dcm"
            store.put(report_key, data, SR_MEDIA_TYPE)
    except Exception as exc:
        return _completion_failed(settings, database, batch_id, earlier, exc)
    return _record_completion(settings, database, batch_id, report_key, report_uid)


def _record_completion(
    settings: Settings,
    database: Database,
    batch_id: str,
    report_key: str | None,
    report_uid: str | None,
    failure: dict[str, Any] | None = None,
) -> bool:
    """Mark the batch completed (once: the pass that flips `result_pending` wins) and schedule its deliveries."""
    with database.session() as session:
        batch = session.get(Batch, batch_id)
        callback_url = batch.callback_url if batch is not None else None
        now = utcnow()
        deliveries: dict[str, dict[str, Any]] = {COMPLETION: failure} if failure else {}
        if report_key and batch is not None:
            deliveries.update(choose_sr_deliveries(session, settings, batch))
        if callback_url:
            deliveries["callback"] = {"status": "pending", "attempts": 0, "target": callback_url}
        due = any(state["status"] == "pending" for state in deliveries.values())
        won = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.result_pending.is_(True))
            .values(
                result_pending=None,
                completed_at=now,
                report_key=report_key,
                report_sop_instance_uid=report_uid,
                deliveries=deliveries or None,
                delivery_due_at=now if due else None,
            )
        )
        done = bool(won.rowcount)  # type: ignore[attr-defined]
    if done:
        log.info("batch %s completed%s", batch_id, " with a structured report" if report_key else "")
    return done


def _completion_failed(
    settings: Settings, database: Database, batch_id: str, earlier: dict[str, Any], exc: Exception
) -> bool:
    """Record why a batch's result could not be made. A report its instances cannot make
    (`report_failed`), or a failure that outlasted `delivery_attempts` tries, completes the batch without
    a report -- its callback still goes out; anything else is retried later, after doubling pauses."""
    attempts = int(earlier.get("attempts", 0)) + 1
    code = exc.code if isinstance(exc, XrayqError) else "report_failed"
    detail = exc.detail if isinstance(exc, XrayqError) else f"{type(exc).__name__}: {exc}"
    state: dict[str, Any] = {"status": "failed", "attempts": attempts, "code": code, "last_error": detail[:500]}
    log.warning("completing batch %s failed (attempt %d): %s: %s", batch_id, attempts, code, detail)
    made_by_the_instances = isinstance(exc, XrayqError)  # `build_report`'s own: the same on every try
    if made_by_the_instances or attempts >= settings.delivery_attempts:
        _record_completion(settings, database, batch_id, None, None, failure=state)
        return False
    pause = settings.delivery_retry_after_s * 2 ** (attempts - 1)
    state.update(status="pending", next_at=_timestamp(utcnow() + timedelta(seconds=pause)))
    with database.session() as session:
        session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.result_pending.is_(True))
            .values(deliveries={COMPLETION: state})
        )
    return False


def _timestamp(moment: datetime) -> str:
    # One fixed format, so timestamps kept in JSON compare as text in SQL in time order.
    return moment.isoformat(timespec="microseconds")


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
                confidence=job.confidence,
                uncertainty=job.uncertainty,
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
