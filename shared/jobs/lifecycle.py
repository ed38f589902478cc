"""The job service: submit images as jobs, publish them, and describe jobs and batches.

Callable without HTTP; the gateway is a thin shell over these functions.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload

from shared.core.errors import XrayqError
from shared.core.queue import PREDICT_QUEUE, PREDICT_TASK
from shared.core.storage import ObjectStore
from shared.db.models import Batch, Job, JobStatus, ModelVersion, as_utc, new_id, utcnow
from shared.models.registry import parse_model_ref, resolve_version
from shared.schemas import (
    BatchCounts,
    BatchStatusName,
    BatchView,
    DeliveryView,
    JobError,
    JobResult,
    JobView,
    ModelRef,
    ReportView,
    StudyView,
)

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


@dataclass
class Upload:
    """One submitted file: its bytes and name, its sniffed type, or why it was refused."""

    filename: str
    data: bytes
    media_type: str | None = None
    error: XrayqError | None = None
    dicom: dict[str, str] | None = None  # identifying tags of a DICOM input


def check_model_available(session: Session, model_ref: str) -> tuple[str, int | None]:
    """Refuse submissions no model could answer (unknown name, no active version)."""
    name, version = parse_model_ref(model_ref)
    resolve_version(session, name, version)
    return name, version


def create_jobs(
    session: Session,
    store: ObjectStore,
    uploads: Sequence[Upload],
    *,
    model_ref: str,
    as_batch: bool,
    client_ref: str | None = None,
    organisation: str | None = None,
    callback_url: str | None = None,
    callback_secret: str | None = None,
) -> tuple[Batch | None, list[Job]]:
    """Store the inputs, then add the rows (flushed, not committed: the caller's unit of work commits).

    Inputs go to storage first, so a committed row always finds its bytes. Uploads that were refused
    (`error` set) become failed jobs at once: they keep their place and name in the batch, and never
    reach a worker.
    """
    name, version = check_model_available(session, model_ref)
    if as_batch and version is None:
        # A batch is answered by one version: the one active now. A promotion while it is in flight
        # applies to the next batch, never to half of this one.
        version = resolve_version(session, name).version
    batch = None
    if as_batch:
        batch = Batch(
            id=new_id(),
            model_name=name,
            total=len(uploads),
            client_ref=client_ref,
            organisation=organisation,
            callback_url=callback_url,
            callback_secret=callback_secret,
            result_pending=True if callback_url else None,  # the callback is sent once all jobs finish
        )
        session.add(batch)
    jobs, to_store = new_jobs(
        uploads,
        model_name=name,
        model_version=version,
        batch_id=batch.id if batch else None,
        client_ref=client_ref,
        organisation=organisation,
    )
    put_all(store, to_store)
    session.add_all(jobs)
    session.flush()
    return batch, jobs


def new_jobs(
    uploads: Sequence[Upload],
    *,
    model_name: str,
    model_version: int | None,
    batch_id: str | None,
    client_ref: str | None,
    organisation: str | None,
    first_position: int = 0,
) -> tuple[list[Job], list[tuple[str, bytes, str]]]:
    """Job rows for the uploads (not yet added to a session), and the inputs they need stored."""
    now = utcnow()
    jobs = [
        Job(
            id=new_id(),
            batch_id=batch_id,
            position=first_position + offset,
            filename=upload.filename,
            media_type=upload.media_type or "application/octet-stream",
            input_bytes=len(upload.data),
            input_sha256=hashlib.sha256(upload.data).hexdigest(),
            client_ref=client_ref,
            organisation=organisation,
            model_name=model_name,
            model_version_requested=model_version,
            dicom=upload.dicom,
            attempts=0,
            created_at=now,
        )
        for offset, upload in enumerate(uploads)
    ]
    to_store = []
    for job, upload in zip(jobs, uploads, strict=True):
        if upload.error is not None:
            job.status = JobStatus.failed
            job.error_code = upload.error.code
            job.error_detail = upload.error.detail
            job.finished_at = now
        else:
            job.status = JobStatus.queued
            job.input_key = f"inputs/{now:%Y/%m/%d}/{job.id}"
            to_store.append((job.input_key, upload.data, job.media_type))
    return jobs, to_store


def put_all(store: ObjectStore, items: list[tuple[str, bytes, str]]) -> None:
    """Store many inputs; in parallel, since an S3 put is a network round trip."""
    if len(items) <= 1:
        for key, data, media_type in items:
            store.put(key, data, media_type)
        return
    list(_put_pool().map(lambda item: store.put(*item), items))


@lru_cache(maxsize=1)
def _put_pool() -> ThreadPoolExecutor:
    # One pool per process, made once: starting threads per request cost more than local puts.
    return ThreadPoolExecutor(max_workers=16, thread_name_prefix="put")


def publish_jobs(celery: Celery, job_ids: Sequence[str], chunk_size: int) -> bool:
    """Put the jobs on queue `predict` in chunks (one forward pass per chunk). Call after commit.

    A failed publish leaves the jobs `queued` in the database, from where they can be published
    again; it never loses them. Returns whether everything was published.
    """
    try:
        for start in range(0, len(job_ids), chunk_size):
            celery.send_task(
                PREDICT_TASK,
                args=[list(job_ids[start : start + chunk_size])],
                queue=PREDICT_QUEUE,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
            )
    except Exception:
        log.exception("could not publish %d jobs; they stay queued", len(job_ids))
        return False
    return True


def job_view(job: Job) -> JobView:
    result = None
    if job.status == JobStatus.succeeded and job.label is not None:
        answered: ModelVersion | None = job.model_version
        result = JobResult(
            label=job.label,
            probabilities=job.probabilities or {},
            model=ModelRef(
                name=answered.name if answered else job.model_name, version=answered.version if answered else None
            ),
        )
    return JobView(
        id=job.id,
        status=job.status.value,
        filename=job.filename,
        batch_id=job.batch_id,
        position=job.position,
        media_type=job.media_type,
        input_sha256=job.input_sha256,
        client_ref=job.client_ref,
        model=ModelRef(name=job.model_name, version=job.model_version_requested),
        result=result,
        error=JobError(code=job.error_code, detail=job.error_detail) if job.error_code else None,
        warnings=job.warnings or [],
        dicom=job.dicom,
        attempts=job.attempts,
        created_at=as_utc(job.created_at),
        started_at=as_utc(job.started_at),
        finished_at=as_utc(job.finished_at),
        timings=job.timings,
    )


def get_job(session: Session, job_id: str, organisation: str | None = None) -> Job:
    """The job, if it exists and (when `organisation` is given) that organisation submitted it."""
    job = session.get(Job, job_id)
    if job is None or (organisation is not None and job.organisation != organisation):
        raise XrayqError("job_not_found", f"No job with id {job_id!r}.")
    return job


def batch_status(counts: BatchCounts, total: int) -> BatchStatusName:
    finished = counts.succeeded + counts.failed + counts.cancelled
    if finished < total:
        return "queued" if counts.running == 0 and finished == 0 else "running"
    if counts.succeeded == total:
        return "succeeded"
    if counts.succeeded == 0:
        return "cancelled" if counts.cancelled == total else "failed"
    return "partially_failed"


def batch_view(
    session: Session, batch_id: str, cursor: int = 0, limit: int = 100, organisation: str | None = None
) -> BatchView:
    batch = session.get(Batch, batch_id)
    if batch is None or (organisation is not None and batch.organisation != organisation):
        raise XrayqError("batch_not_found", f"No batch with id {batch_id!r}.")
    rows = session.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)).all()
    counts = BatchCounts(**{status.value: count for status, count in rows})
    finished = counts.succeeded + counts.failed + counts.cancelled
    page = session.scalars(
        select(Job)
        .options(selectinload(Job.model_version))
        .where(Job.batch_id == batch_id, Job.position >= cursor)
        .order_by(Job.position)
        .limit(limit + 1)
    ).all()
    next_cursor = str(page[limit].position) if len(page) > limit else None
    status = batch_status(counts, batch.total)
    if batch.study_instance_uid is not None and batch.stable_at is None:
        status = "collecting"
    return BatchView(
        id=batch.id,
        status=status,
        model=ModelRef(name=batch.model_name),
        client_ref=batch.client_ref,
        created_at=as_utc(batch.created_at),
        total=batch.total,
        counts=counts,
        progress=round(finished / batch.total, 4) if batch.total else 1.0,
        jobs=[job_view(job) for job in page[:limit]],
        next_cursor=next_cursor,
        study=_study_view(batch),
        completed_at=as_utc(batch.completed_at),
        report=ReportView(location=f"/v1/batches/{batch.id}/report", sop_instance_uid=batch.report_sop_instance_uid)
        if batch.report_key and batch.report_sop_instance_uid
        else None,
        deliveries={name: DeliveryView(**state) for name, state in (batch.deliveries or {}).items()},
    )


def _study_view(batch: Batch) -> StudyView | None:
    if batch.study_instance_uid is None:
        return None
    return StudyView(
        study_instance_uid=batch.study_instance_uid,
        accession_number=batch.accession_number,
        source=batch.source,
        stable=batch.stable_at is not None,
        last_instance_at=as_utc(batch.last_instance_at),
        stable_at=as_utc(batch.stable_at),
    )


def cancel_job(session: Session, job_id: str, organisation: str | None = None) -> Job:
    """A queued job becomes `cancelled` (workers skip it); one already running or finished cannot be."""
    job = get_job(session, job_id, organisation)
    updated = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(
            status=JobStatus.cancelled,
            finished_at=utcnow(),
            error_code="cancelled",
            error_detail="Cancelled by the client.",
        )
    )
    if updated.rowcount == 0:  # type: ignore[attr-defined]
        session.refresh(job)
        raise XrayqError(
            "job_not_cancellable", f"Job {job_id} is {job.status.value}; only queued jobs can be cancelled."
        )
    session.refresh(job)
    return job


def study_report(session: Session, store: ObjectStore, batch_id: str, organisation: str | None = None) -> bytes:
    """The stored SR of a study batch, or why there is none (yet)."""
    batch = session.get(Batch, batch_id)
    if batch is None or (organisation is not None and batch.organisation != organisation):
        raise XrayqError("batch_not_found", f"No batch with id {batch_id!r}.")
    if batch.study_instance_uid is None:
        raise XrayqError("report_not_available", "Only study batches (DIMSE, STOW-RS, /v1/studies) have a report.")
    if batch.completed_at is None:
        raise XrayqError(
            "report_not_ready", "The study is still collecting instances or being classified; try again later."
        )
    if batch.report_key is None:
        raise XrayqError("report_not_available", "No instance of this study could be classified, so no report.")
    return store.get(batch.report_key)
