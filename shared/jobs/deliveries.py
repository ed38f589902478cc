"""Finishing batches: seal stable studies, build each finished study's SR, send results out.

Run periodically by every gateway (`finish_pass`). The database is the truth and every step is safe
to repeat or to run in several gateways at once: sealing is one conditional UPDATE; a result is
recorded only by the pass that flips `result_pending` (the SR's UIDs and storage key are fixed by the
batch id, so a concurrent rebuild writes the same object); a due delivery is claimed by moving its
`delivery_due_at` forward before it is tried. Failed deliveries are retried with doubling pauses up
to `delivery_attempts`, then marked failed -- visible on the batch, never silently dropped.
"""

from __future__ import annotations

import io
import logging
from datetime import datetime, timedelta
from typing import Any

import pydicom
from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session, selectinload

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectNotFound, ObjectStore
from shared.db.models import Batch, Job, JobStatus, as_utc, utcnow
from shared.db.session import Database
from shared.imaging.dimse import send_c_store
from shared.imaging.reports import ClassifiedInstance, build_report
from shared.jobs.callbacks import post_callback
from shared.jobs.sr_destinations import choose_sr_deliveries, is_sr_delivery, sr_delivery_address
from shared.jobs.studies import seal_stable_studies
from shared.jobs.views import batch_view

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


def deliver_due(settings: Settings, database: Database, store: ObjectStore, limit: int = 20) -> int:
    """Try every delivery that is due; returns how many were delivered."""
    now = utcnow()
    with database.session() as session:
        due = session.execute(
            select(Batch.id, Batch.delivery_due_at).where(Batch.delivery_due_at <= now).limit(limit)
        ).all()
    delivered = 0
    for batch_id, due_at in due:
        if due_at is not None and _claim(database, batch_id, due_at, settings):
            delivered += _deliver(settings, database, store, batch_id)
    return delivered


def _claim(database: Database, batch_id: str, due_at: datetime, settings: Settings) -> bool:
    # Another gateway that read the same due time loses this conditional update. The lease outlasts
    # a delivery's timeouts, so a pass that dies mid-delivery is retried after it.
    lease = utcnow() + timedelta(seconds=4 * settings.dicom_network_timeout_s + 2 * settings.callback_timeout_s)
    with database.session() as session:
        claimed = session.execute(
            update(Batch).where(Batch.id == batch_id, Batch.delivery_due_at == due_at).values(delivery_due_at=lease)
        )
        return bool(claimed.rowcount)  # type: ignore[attr-defined]


def _deliver(settings: Settings, database: Database, store: ObjectStore, batch_id: str) -> int:
    with database.session() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        states = {name: dict(state) for name, state in (batch.deliveries or {}).items()}
        payload = None
        if "callback" in states:
            payload = {
                "event": "batch.completed",
                "batch": batch_view(session, batch_id, limit=500).model_dump(mode="json"),
            }
        report_key, callback_url, callback_secret = batch.report_key, batch.callback_url, batch.callback_secret
    delivered = 0
    for name, state in states.items():
        if state["status"] != "pending" or not _is_due(state):
            continue
        try:
            if is_sr_delivery(name):
                assert report_key is not None
                send_c_store(
                    store.get(report_key),
                    sr_delivery_address(database, settings, batch_id, state),
                    settings.dicom_ae_title,
                    settings.dicom_network_timeout_s,
                )
            else:
                assert callback_url and callback_secret and payload is not None
                post_callback(
                    callback_url, callback_secret, "batch.completed", batch_id, payload, settings.callback_timeout_s
                )
        except (XrayqError, ObjectNotFound, OSError) as exc:
            _record_failure(state, exc, settings)
            log.warning("delivery %s of batch %s failed (attempt %d): %s", name, batch_id, state["attempts"], exc)
            continue
        state.update(status="delivered", attempts=state["attempts"] + 1, delivered_at=utcnow().isoformat())
        state.pop("next_at", None)
        delivered += 1
    pending = [state["next_at"] for state in states.values() if state["status"] == "pending" and "next_at" in state]
    with database.session() as session:
        session.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(
                deliveries=states,
                delivery_due_at=min(datetime.fromisoformat(at) for at in pending) if pending else None,
            )
        )
    return delivered


def _is_due(state: dict[str, Any]) -> bool:
    return "next_at" not in state or as_utc(datetime.fromisoformat(state["next_at"])) <= utcnow()


def _record_failure(state: dict[str, Any], exc: Exception, settings: Settings) -> None:
    state["attempts"] += 1
    state["last_error"] = exc.detail if isinstance(exc, XrayqError) else f"{type(exc).__name__}: {exc}"
    if state["attempts"] >= settings.delivery_attempts:
        state["status"] = "failed"
        state.pop("next_at", None)
        return
    pause = settings.delivery_retry_after_s * 2 ** (state["attempts"] - 1)
    state["next_at"] = (utcnow() + timedelta(seconds=pause)).isoformat()
