"""The life of a prediction job, every transition in one place.

    queued --claim--> running --result--> succeeded
       |                 |   --failure--> failed (with its code; `too_many_attempts` past the limit)
       |                 '--stale--> published again (the claim counts the attempt)
       '--cancel--> cancelled         queued and lost: published again

Creation (`shared.jobs.creation`) commits rows, then publishes their ids (`commit_then_publish`); a
worker claims them (`claim_jobs`) and records what became of them (`record_outcomes`); the reconciler
finds the jobs whose message was lost (`jobs_to_republish`) and publishes them again.

Delivery is at-least-once, so every step is safe to repeat: a claim takes only queued jobs (or running
ones whose worker died), an outcome is written only to a job not yet terminal (a result is written
once), and attempts are counted when a worker takes a job, so a job that keeps killing its worker ends
`too_many_attempts` while extra copies of its message cost nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, and_, bindparam, func, or_, select, true, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.queue import PREDICT_QUEUE, PREDICT_TASK, PUBLISHED_AT_HEADER
from shared.core.settings import Settings
from shared.db.models import ExplanationStatus, Job, JobStatus, ModelVersion, as_utc, utcnow
from shared.jobs.views import get_job
from shared.models.registry import resolve_version

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

# "Not yet finished", spelled as equalities rather than NOT IN: executemany refuses expanding lists.
_NOT_TERMINAL = or_(*(Job.status == status for status in JobStatus if not status.terminal))
# Key in an unfinished job's `timings`: when the reconciler last published it (epoch seconds).
REPUBLISHED_AT = "republished_at"
_CLAIMED_COLUMNS = (
    Job.id,
    Job.input_key,
    Job.model_name,
    Job.model_version_requested,
    Job.created_at,
    Job.dicom,
    Job.attempts,
    Job.explanation_status,
    Job.organisation,
    Job.input_sha256,
    Job.batch_id,
)


# --- queued: on the queue -------------------------------------------------------------------------


def publish_jobs(celery: Celery, job_ids: Sequence[str], chunk_size: int) -> bool:
    """Put the jobs on queue `predict` in chunks (one forward pass per chunk). Call after commit.

    A failed publish leaves the jobs `queued` in the database, from where they can be published
    again; it never loses them. Returns whether everything was published.
    """
    try:
        for start in range(0, len(job_ids), chunk_size):
            chunk = list(job_ids[start : start + chunk_size])
            celery.send_task(
                PREDICT_TASK,
                args=[chunk],
                queue=PREDICT_QUEUE,
                headers={PUBLISHED_AT_HEADER: time.time()},
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
            )
            # Names the request's jobs in its log context: a grep for the request id finds its job ids.
            log.info("published %d jobs on %s", len(chunk), PREDICT_QUEUE, extra={"job_ids": chunk})
    except Exception:
        log.exception("could not publish %d jobs; they stay queued", len(job_ids))
        return False
    return True


def commit_then_publish(session: Session, celery: Celery, job_ids: Sequence[str], chunk_size: int) -> bool:
    """Commit the unit of work, then publish the jobs: a worker never gets an id whose row it cannot see.

    A commit that fails raises and publishes nothing; a publish that fails leaves the committed jobs
    queued for the reconciler. Returns whether everything was published.
    """
    session.commit()
    return publish_jobs(celery, job_ids, chunk_size) if job_ids else True


def jobs_to_republish(
    session: Session, settings: Settings, *, drained_before: datetime | None, limit: int
) -> list[str]:
    """Jobs whose message is presumed lost, oldest first: one query, however busy the queue.

    `drained_before` is when the oldest message still waiting on `predict` was published (now if the
    queue is empty; None if unknown): every message published earlier has left the queue. A queued
    job last published before it (less `requeue_after_s`, for the moments between a row's commit and
    its publish, a worker's one prefetched message, and clocks) has no message left on the queue, so
    it was lost; a busy queue no longer hides that. A running job whose claim is older than
    `stale_running_after_s` lost its worker. Either is published again only once its last republished
    message has left the queue too, so a worker outage does not pile up copies.
    """
    now = utcnow()
    stale_running = and_(
        Job.status == JobStatus.running, Job.started_at < now - timedelta(seconds=settings.stale_running_after_s)
    )
    slack = timedelta(seconds=settings.requeue_after_s)
    republished_at = func.coalesce(Job.timings[REPUBLISHED_AT].as_float(), 0.0)
    if drained_before is None:  # nothing can be known about the queue: only dead workers' jobs
        condition = and_(
            stale_running, republished_at < (now - timedelta(seconds=settings.stale_running_after_s)).timestamp()
        )
    else:
        left_queue = republished_at < (drained_before - slack).timestamp()
        lost_queued = and_(Job.status == JobStatus.queued, Job.created_at < drained_before - slack)
        condition = and_(or_(lost_queued, stale_running), left_queue)
    return list(
        session.scalars(
            select(Job.id).where(condition, Job.input_key.is_not(None)).order_by(Job.created_at).limit(limit)
        )
    )


def mark_republished(session: Session, job_ids: Sequence[str], published_at: datetime) -> None:
    """Remember when the reconciler published these jobs again (in `timings`, which holds nothing
    before a job finishes and is rewritten when it does), so it waits for that message to leave the
    queue before sending another."""
    session.execute(
        update(Job).where(Job.id.in_(job_ids), _NOT_TERMINAL).values(timings={REPUBLISHED_AT: published_at.timestamp()})
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


# --- running: claimed by a worker -----------------------------------------------------------------


@dataclass
class ClaimedJob:
    """What a worker needs of a job it claimed."""

    id: str
    input_key: str | None
    model_name: str
    model_version_requested: int | None
    created_at: datetime
    dicom: dict[str, str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # Its explanation is pending: the worker explains the answer once it is written. Read by the claim
    # itself, so a job that asked nothing costs nothing more.
    explain: bool = False
    # Whose job it is and its input's sha256: what the result cache is keyed by, with the version
    # (the organisation and batch also go on the worker's log lines).
    organisation: str | None = None
    input_sha256: str | None = None
    batch_id: str | None = None


@dataclass
class Claim:
    jobs: list[ClaimedJob]
    # Per (model name, requested version) of the claimed jobs: the version that answers them, or why none can.
    versions: dict[tuple[str, int | None], ModelVersion | XrayqError]


def claim_jobs(session: Session, job_ids: Sequence[str], settings: Settings, *, redelivered: bool = False) -> Claim:
    """Mark the message's claimable jobs running and count the attempt; fail those out of attempts.

    An attempt is counted only when a worker takes a job: a queued job; a running one whose claim is
    older than `stale_running_after_s` (its worker died); or, for a message the broker `redelivered`
    (its worker process died holding it), its running jobs. Copies of a message that the reconciler
    sent during a worker outage therefore find the job claimed (or finished) and cost nothing: the
    outage never pushes a healthy job past `max_attempts`.

    A message shorter than a chunk also takes single jobs that are still waiting (dynamic batching,
    `coalesce_singles`): under load one forward pass then serves many single-image clients, and their
    own messages, arriving later, find them finished and do nothing.

    Each claim is one UPDATE ... RETURNING, so the write lock is taken by the statement that reads:
    two worker processes never claim the same waiting job (Postgres: SKIP LOCKED; SQLite: one writer
    at a time, with no read-then-write window in between).
    """
    now = utcnow()
    table = cast(Table, Job.__table__)
    claim = (
        update(table)
        .values(attempts=table.c.attempts + 1, status=JobStatus.running, started_at=now)  # this attempt's start
        .returning(*_CLAIMED_COLUMNS)
    )
    abandoned = table.c.started_at < now - timedelta(seconds=settings.stale_running_after_s)
    claimable = or_(
        table.c.status == JobStatus.queued,
        and_(table.c.status == JobStatus.running, true() if redelivered else abandoned),
    )
    connection = session.connection()
    rows = list(connection.execute(claim.where(table.c.id.in_(job_ids), claimable)))
    room = settings.predict_chunk_size - len(rows)
    if settings.coalesce_singles and room > 0:
        waiting = (
            select(table.c.id)
            .where(table.c.status == JobStatus.queued, table.c.batch_id.is_(None), table.c.id.not_in(job_ids))
            .order_by(table.c.created_at)
            .limit(room)
        )
        if connection.dialect.name == "postgresql":
            waiting = waiting.with_for_update(skip_locked=True)
        rows += connection.execute(claim.where(table.c.id.in_(waiting.scalar_subquery())))
    # A message that keeps killing its worker must not loop forever.
    exhausted = [row.id for row in rows if row.attempts > settings.max_attempts]
    if exhausted:
        connection.execute(
            update(table)
            .where(table.c.id.in_(exhausted))
            .values(
                status=JobStatus.failed,
                error_code="too_many_attempts",
                error_detail=f"Gave up after {settings.max_attempts} attempts.",
                finished_at=now,
            )
        )
    # Resolved per message, in the claim's transaction, never cached: a newly activated version
    # serves from the next message on.
    versions: dict[tuple[str, int | None], ModelVersion | XrayqError] = {}
    for row in rows:
        key = (row.model_name, row.model_version_requested)
        if key not in versions:
            try:
                versions[key] = resolve_version(session, *key)
                session.expunge(versions[key])
            except XrayqError as error:
                versions[key] = error
    jobs = []
    for row in rows:
        if row.attempts > settings.max_attempts:
            continue
        created = as_utc(row.created_at)
        jobs.append(
            ClaimedJob(
                row.id,
                row.input_key,
                row.model_name,
                row.model_version_requested,
                created,
                row.dicom,
                {"queue_ms": ms_since(created, now)},
                explain=row.explanation_status == ExplanationStatus.pending,
                organisation=row.organisation,
                input_sha256=row.input_sha256,
                batch_id=row.batch_id,
            )
        )
    return Claim(jobs, versions)


# --- finished: succeeded or failed ----------------------------------------------------------------


@dataclass
class Prediction:
    """A claimed job's answer."""

    job: ClaimedJob
    label: str
    probabilities: dict[str, float]
    model_version_id: str
    warnings: list[dict[str, str]] | None = None  # {"code", "detail"}: suitability, uncertainty, ...
    confidence: float | None = None  # the (calibrated) probability of `label`
    calibrated: bool | None = None
    uncertainty: float | None = None  # in [0, 1]; None: the version has no threshold to judge it by
    uncertain: bool | None = None
    cached_from: str | None = None  # the job whose stored result this repeats (the result cache)


def record_outcomes(
    session: Session,
    *,
    predictions: Sequence[Prediction] = (),
    failures: Sequence[tuple[ClaimedJob, XrayqError]] = (),
) -> set[str]:
    """All outcomes of a chunk in one statement (one executemany round trip), each written only to a
    job not yet finished: a redelivered message never rewrites a result.

    If that statement fails (one row the database refuses), each outcome is written on its own, so
    one job's bad row never keeps its chunk-mates' results out; a job whose own row is refused fails
    with `result_unwritable` instead. Returns the ids of the jobs whose result could not be written.
    """
    finished = utcnow()
    rows = [_outcome_row(prediction.job, finished, prediction=prediction) for prediction in predictions]
    rows += [_outcome_row(job, finished, error=error) for job, error in failures]
    if not rows:
        return set()
    try:
        with session.begin_nested():  # a savepoint: its failure leaves the transaction usable
            session.connection().execute(_OUTCOME_UPDATE, rows)
        return set()
    except DBAPIError:
        log.warning("the batched write of %d outcomes failed; writing them one by one", len(rows), exc_info=True)
    unwritable: set[str] = set()
    for row in rows:
        try:
            with session.begin_nested():
                session.connection().execute(_OUTCOME_UPDATE, [row])
        except DBAPIError:
            log.exception("the outcome of job %s could not be written", row["job_id"])
            unwritable.add(row["job_id"])
    for row in rows:
        if row["job_id"] not in unwritable:
            continue
        error = XrayqError("result_unwritable", "The job's result could not be stored.")
        failure = {**row, **_failure_columns(error)}
        try:
            with session.begin_nested():
                session.connection().execute(_OUTCOME_UPDATE, [failure])
        except DBAPIError:  # the database refuses even that: the job stays running for the reconciler
            log.exception("job %s could not even be failed", row["job_id"])
    return unwritable


def _outcome_row(
    job: ClaimedJob, finished: datetime, *, prediction: Prediction | None = None, error: XrayqError | None = None
) -> dict[str, Any]:
    if prediction is not None:
        columns: dict[str, Any] = {
            "new_status": JobStatus.succeeded,
            "new_label": prediction.label,
            "new_probabilities": prediction.probabilities,
            "new_model_version_id": prediction.model_version_id,
            "new_warnings": prediction.warnings or None,
            "new_confidence": prediction.confidence,
            "new_calibrated": prediction.calibrated,
            "new_uncertainty": prediction.uncertainty,
            "new_uncertain": prediction.uncertain,
            "new_cached_from": prediction.cached_from,
            "new_error_code": None,
            "new_error_detail": None,
        }
    else:
        assert error is not None
        columns = _failure_columns(error)
    timings = {**job.timings, "total_ms": ms_since(job.created_at, finished)}
    return {**columns, "job_id": job.id, "new_timings": timings, "new_finished_at": finished}


def _failure_columns(error: XrayqError) -> dict[str, Any]:
    return {
        "new_status": JobStatus.failed,
        "new_label": None,
        "new_probabilities": None,
        "new_model_version_id": None,
        "new_warnings": None,
        "new_confidence": None,
        "new_calibrated": None,
        "new_uncertainty": None,
        "new_uncertain": None,
        "new_cached_from": None,
        "new_error_code": error.code,
        "new_error_detail": error.detail,
    }


_JOBS = cast(Table, Job.__table__)
# One outcome per job id, written only to a job that is not yet finished.
_OUTCOME_UPDATE = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"), _NOT_TERMINAL)
    .values(
        status=bindparam("new_status"),
        label=bindparam("new_label"),
        probabilities=bindparam("new_probabilities"),
        model_version_id=bindparam("new_model_version_id"),
        error_code=bindparam("new_error_code"),
        error_detail=bindparam("new_error_detail"),
        timings=bindparam("new_timings"),
        warnings=bindparam("new_warnings"),
        confidence=bindparam("new_confidence"),
        calibrated=bindparam("new_calibrated"),
        uncertainty=bindparam("new_uncertainty"),
        uncertain=bindparam("new_uncertain"),
        cached_from=bindparam("new_cached_from"),
        finished_at=bindparam("new_finished_at"),
    )
)


def ms_since(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds() * 1000, 2)
