"""What clients see of jobs and batches: the lookups the routes make and the row -> schema views."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from shared.core.errors import XrayqError
from shared.core.storage import ObjectStore
from shared.db.models import Batch, ExplanationStatus, Job, JobStatus, ModelVersion, as_utc
from shared.schemas import (
    BatchCounts,
    BatchStatusName,
    BatchView,
    DeliveryView,
    ExplanationState,
    JobError,
    JobResult,
    JobView,
    ModelRef,
    ReportView,
    StudyView,
)


def get_job(session: Session, job_id: str, organisation: str | None = None) -> Job:
    """The job, if it exists and (when `organisation` is given) that organisation submitted it."""
    job = session.get(Job, job_id)
    if job is None or (organisation is not None and job.organisation != organisation):
        raise XrayqError("job_not_found", f"No job with id {job_id!r}.")
    return job


def get_batch(session: Session, batch_id: str, organisation: str | None = None) -> Batch:
    """The batch, if it exists and (when `organisation` is given) that organisation submitted it."""
    batch = session.get(Batch, batch_id)
    if batch is None or (organisation is not None and batch.organisation != organisation):
        raise XrayqError("batch_not_found", f"No batch with id {batch_id!r}.")
    return batch


def job_view(job: Job) -> JobView:
    result = None
    if job.status == JobStatus.succeeded and job.label is not None:
        answered: ModelVersion | None = job.model_version
        probabilities = job.probabilities or {}
        result = JobResult(
            label=job.label,
            probabilities=probabilities,
            model=ModelRef(
                name=answered.name if answered else job.model_name, version=answered.version if answered else None
            ),
            # Jobs answered before confidence was stored were answered uncalibrated: their probability is it.
            confidence=job.confidence if job.confidence is not None else float(probabilities.get(job.label, 0.0)),
            calibrated=bool(job.calibrated),
            uncertainty=job.uncertainty,
            uncertain=job.uncertain,
            cached=job.cached_from is not None,
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
        # Only a finished job's: before that the column holds the reconciler's bookkeeping.
        timings=job.timings if job.status.terminal else None,
        explanation=explanation_state(job),
    )


# A job that ended so can have no explanation, whatever was asked.
UNSUCCESSFUL = frozenset({JobStatus.failed, JobStatus.cancelled})


def explanation_location(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/explanation"


def not_succeeded(job: Job) -> XrayqError:
    return XrayqError("job_not_succeeded", f"Job {job.id} is {job.status.value}: only an answered job is explained.")


def explanation_state(job: Job) -> ExplanationState | None:
    """Where the job's explanation stands (None: never asked for; see `shared.jobs.explanations`)."""
    if job.explanation_status is None:
        return None
    error = None
    if job.status in UNSUCCESSFUL:
        failure = not_succeeded(job)
        status, error = ExplanationStatus.failed, JobError(code=failure.code, detail=failure.detail)
    else:
        status = job.explanation_status
        if status == ExplanationStatus.failed:
            record = job.explanation or {}
            error = JobError(code=record.get("code", "explanation_failed"), detail=record.get("detail"))
    return ExplanationState(job_id=job.id, status=status.value, location=explanation_location(job.id), error=error)


def batch_status(counts: BatchCounts, total: int) -> BatchStatusName:
    finished = counts.succeeded + counts.failed + counts.cancelled
    if finished < total:
        return "queued" if counts.running == 0 and finished == 0 else "running"
    if counts.succeeded == total:
        return "succeeded"
    if counts.succeeded == 0:
        return "cancelled" if counts.cancelled == total else "failed"
    return "partially_failed"


def batch_state(batch: Batch, counts: BatchCounts) -> BatchStatusName:
    """A study batch is `collecting` until it is stable; any batch else is what its jobs make it."""
    if batch.study_instance_uid is not None and batch.stable_at is None:
        return "collecting"
    return batch_status(counts, batch.total)


def batch_outline(batch: Batch, counts: BatchCounts) -> dict[str, Any]:
    """What a batch's view and its summary in a list share: who, what, when, how far."""
    finished = counts.succeeded + counts.failed + counts.cancelled
    return {
        "id": batch.id,
        "status": batch_state(batch, counts),
        "model": ModelRef(name=batch.model_name),
        "client_ref": batch.client_ref,
        "created_at": as_utc(batch.created_at),
        "total": batch.total,
        "counts": counts,
        "progress": round(finished / batch.total, 4) if batch.total else 1.0,
        "completed_at": as_utc(batch.completed_at),
    }


def batch_view(
    session: Session, batch_id: str, cursor: int = 0, limit: int = 100, organisation: str | None = None
) -> BatchView:
    batch = get_batch(session, batch_id, organisation)
    rows = session.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)).all()
    counts = BatchCounts(**{status.value: count for status, count in rows})
    page = session.scalars(
        select(Job)
        .options(selectinload(Job.model_version))
        .where(Job.batch_id == batch_id, Job.position >= cursor)
        .order_by(Job.position)
        .limit(limit + 1)
    ).all()
    next_cursor = str(page[limit].position) if len(page) > limit else None
    return BatchView(
        **batch_outline(batch, counts),
        jobs=[job_view(job) for job in page[:limit]],
        next_cursor=next_cursor,
        study=_study_view(batch),
        report=ReportView(location=f"/v1/batches/{batch.id}/report", sop_instance_uid=batch.report_sop_instance_uid)
        if batch.report_key and batch.report_sop_instance_uid
        else None,
        result_error=_result_error(batch),
        deliveries={
            name: DeliveryView(**state) for name, state in (batch.deliveries or {}).items() if name != COMPLETION
        },
    )


# The key of `Batch.deliveries` that records a failed completion (making the report), not a delivery.
COMPLETION = "completion"


def _result_error(batch: Batch) -> JobError | None:
    failure = (batch.deliveries or {}).get(COMPLETION)
    return JobError(code=failure["code"], detail=failure.get("last_error")) if failure else None


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


def study_report(session: Session, store: ObjectStore, batch_id: str, organisation: str | None = None) -> bytes:
    """The stored SR of a study batch, or why there is none (yet)."""
    batch = get_batch(session, batch_id, organisation)
    if batch.study_instance_uid is None:
        raise XrayqError("report_not_available", "Only study batches (DIMSE, STOW-RS, /v1/studies) have a report.")
    if batch.completed_at is None:
        raise XrayqError(
            "report_not_ready", "The study is still collecting instances or being classified; try again later."
        )
    if batch.report_key is None:
        raise XrayqError("report_not_available", "No instance of this study could be classified, so no report.")
    return store.get(batch.report_key)
