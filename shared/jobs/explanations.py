"""A job's explanation (a Grad-CAM heatmap of its answer): asked for, computed once by a worker, kept with the job.

    (none) --explain=true at submission, or POST .../explanation--> pending --worker--> succeeded | failed

Asked for at submission, the worker that answers the job explains it right after, on the same tensor
(its claim reads that the explanation is pending). Asked for later, the request marks it pending and
publishes an `explain` message for the job (`shared.core.queue.EXPLAIN_TASK`) unless the job is still
queued (its claim will see it). Either way the gateway never runs a model, and a job that asked for
nothing costs nothing more.

Computed once: the worker writes an explanation only while it is pending, and a request for one that
exists answers with it. A failure to explain never touches the job's answer: it is recorded on the
explanation (`explanation_unavailable`: the version's card names no usable layer; `explanation_failed`:
anything else, which a later request may try again).

No torch here (the gateway uses it); the computation is `shared.models.explanations`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.queue import EXPLAIN_TASK, PREDICT_QUEUE, PUBLISHED_AT_HEADER
from shared.db.models import ExplanationStatus, Job, JobStatus, ModelVersion, as_utc, utcnow
from shared.db.session import after_commit
from shared.jobs.views import UNSUCCESSFUL, explanation_location, explanation_state, get_job, not_succeeded
from shared.schemas import ExplanationOverlay, ExplanationState, ExplanationView, ModelRef

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

# Failures a later request may try again (storage or the worker had a bad moment); any other is final.
RETRYABLE = frozenset({"explanation_failed"})


def object_keys(job_id: str, created_at: datetime) -> tuple[str, str]:
    """Where a job's overlay PNG and raw map JSON are stored: beside nothing else, under the job's id."""
    prefix = f"explanations/{as_utc(created_at):%Y/%m/%d}/{job_id}"
    return f"{prefix}/overlay.png", f"{prefix}/map.json"


# --- asked for: the gateway -----------------------------------------------------------------------


@dataclass
class Requested:
    state: ExplanationState
    created: bool  # True: this request asked for it (202); False: it existed already (200)


def request_explanation(
    session: Session, celery: Celery, job_id: str, organisation: str | None, *, republish_after_s: float
) -> Requested:
    """Ask for the job's explanation; the existing one if there is one (computed once).

    Marked pending in one UPDATE that also returns the job's status at that moment, so it cannot fall
    between a worker's claim and its result: a job still queued is explained by the worker that claims
    it; any other gets an `explain` message, published once this unit of work has committed. A request
    for an explanation pending longer than `republish_after_s` publishes its message again (one the
    broker lost), and one for an explanation that failed for a passing reason tries again.
    """
    job = get_job(session, job_id, organisation)
    if job.status in UNSUCCESSFUL:
        raise not_succeeded(job)
    seen = job.explanation_status
    if seen == ExplanationStatus.succeeded:
        return Requested(_state(job), created=False)
    if seen == ExplanationStatus.failed and (job.explanation or {}).get("code") not in RETRYABLE:
        raise explanation_error(job)
    if seen == ExplanationStatus.pending:
        requested_at = float((job.explanation or {}).get("requested_at") or 0.0)
        if job.status != JobStatus.queued and time.time() - requested_at > republish_after_s:
            _mark_requested(session, job)
            _publish_after_commit(session, celery, job.id)
        return Requested(_state(job), created=False)
    status = _mark_pending(session, job, seen)
    if status is None:  # another request or a worker changed it meanwhile: answer with what it is now
        session.refresh(job)
        return Requested(_state(job), created=False)
    if status in UNSUCCESSFUL:
        raise not_succeeded(job)
    if status != JobStatus.queued:
        _publish_after_commit(session, celery, job.id)
    session.refresh(job)
    return Requested(_state(job), created=True)


def _state(job: Job) -> ExplanationState:
    state = explanation_state(job)
    assert state is not None  # asked for by now
    return state


def _mark_pending(session: Session, job: Job, seen: ExplanationStatus | None) -> JobStatus | None:
    """Pending, if it still is what was `seen`; the job's status then (None: it was not)."""
    unchanged = Job.explanation_status.is_(None) if seen is None else Job.explanation_status == seen
    row = session.execute(
        update(Job)
        .where(Job.id == job.id, unchanged)
        .values(explanation_status=ExplanationStatus.pending, explanation={"requested_at": time.time()})
        .returning(Job.status)
    ).first()
    return None if row is None else JobStatus(row.status)


def _mark_requested(session: Session, job: Job) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.explanation_status == ExplanationStatus.pending)
        .values(explanation={**(job.explanation or {}), "requested_at": time.time()})
    )


def _publish_after_commit(session: Session, celery: Celery, job_id: str) -> None:
    after_commit(session, lambda: publish_explanation(celery, job_id))


def publish_explanation(celery: Celery, job_id: str) -> bool:
    """Put the job's `explain` message on queue `predict`. A failed publish leaves the explanation
    pending; asking again later publishes it again."""
    try:
        celery.send_task(
            EXPLAIN_TASK,
            args=[job_id],
            queue=PREDICT_QUEUE,
            headers={PUBLISHED_AT_HEADER: time.time()},
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        )
    except Exception:
        log.exception("could not publish the explanation of job %s; it stays pending", job_id)
        return False
    return True


# --- read: the gateway ----------------------------------------------------------------------------


def explanation_error(job: Job) -> XrayqError:
    record = job.explanation or {}
    return XrayqError(record.get("code", "explanation_failed"), record.get("detail") or "The explanation failed.")


@dataclass
class Explanation:
    """A made explanation as recorded on its job: where its objects are and what it shows."""

    job: Job
    record: dict[str, Any]

    @property
    def overlay_key(self) -> str:
        return str(self.record["overlay_key"])

    @property
    def map_key(self) -> str:
        return str(self.record["map_key"])

    @property
    def model(self) -> ModelRef:
        return ModelRef(name=self.record["model"]["name"], version=self.record["model"]["version"])

    def view(self, document: dict[str, Any]) -> ExplanationView:
        """With the raw map read from storage (`document`)."""
        return ExplanationView(
            job_id=self.job.id,
            model=self.model,
            label=self.record["label"],
            method=self.record["method"],
            target_layer=self.record["target_layer"],
            width=document["width"],
            height=document["height"],
            map=document["map"],
            overlay=ExplanationOverlay(
                location=f"{explanation_location(self.job.id)}?format=png",
                width=self.record["overlay_size"][0],
                height=self.record["overlay_size"][1],
            ),
            created_at=datetime.fromisoformat(self.record["created_at"]) if self.record.get("created_at") else None,
        )


def find_explanation(session: Session, job_id: str, organisation: str | None) -> Explanation | ExplanationState:
    """The job's explanation, or where it stands while pending; the reason there is none as an error:
    `job_not_found` (also another organisation's), `job_not_succeeded`, `explanation_not_requested`, or
    the explanation's own failure."""
    job = get_job(session, job_id, organisation)
    if job.status in UNSUCCESSFUL:
        raise not_succeeded(job)
    if job.explanation_status is None:
        raise XrayqError(
            "explanation_not_requested",
            f"Job {job_id} was not asked for an explanation: POST {explanation_location(job_id)} asks for one.",
        )
    if job.explanation_status == ExplanationStatus.failed:
        raise explanation_error(job)
    if job.explanation_status == ExplanationStatus.pending:
        return _state(job)
    return Explanation(job, dict(job.explanation or {}))


# --- made: the worker -----------------------------------------------------------------------------


def explained(
    *,
    model_version_id: str,
    model: tuple[str, int],
    label: str,
    method: dict[str, str],
    keys: tuple[str, str],
    overlay_size: tuple[int, int],
) -> dict[str, Any]:
    """The record of a made explanation: by which version (its id, name and number), of which class,
    how (`method`: the method, target layer and layout), and where its objects are."""
    return {
        **method,
        "model_version_id": model_version_id,
        "model": {"name": model[0], "version": model[1]},
        "label": label,
        "overlay_key": keys[0],
        "map_key": keys[1],
        "overlay_size": list(overlay_size),
        "created_at": utcnow().isoformat(),
    }


def record_explanation(
    session: Session, job_id: str, *, made: dict[str, Any] | None = None, error: XrayqError | None = None
) -> bool:
    """Write a made explanation (or why it failed) to a job whose explanation is pending and whose
    answer stands; False when it was not (made meanwhile by another worker, or the job failed)."""
    if made is not None:
        values: dict[str, Any] = {"explanation_status": ExplanationStatus.succeeded, "explanation": made}
    else:
        assert error is not None
        values = {
            "explanation_status": ExplanationStatus.failed,
            "explanation": {"code": error.code, "detail": error.detail[:500], "failed_at": utcnow().isoformat()},
        }
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.explanation_status == ExplanationStatus.pending,
            Job.status == JobStatus.succeeded,
        )
        .values(**values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


@dataclass
class PendingExplanation:
    """What a worker needs to explain one answered job on its own (asked for after the answer)."""

    job_id: str
    input_key: str | None
    created_at: datetime
    label: str
    version: ModelVersion  # the version that answered it, detached from the session


def pending_explanation(session: Session, job_id: str) -> PendingExplanation | JobStatus | None:
    """The job's pending explanation, once the job is answered; its status while it is not (queued or
    running: try later); None when there is nothing to do (made, failed, or the job will never be)."""
    job = session.get(Job, job_id)
    if job is None or job.explanation_status != ExplanationStatus.pending:
        return None
    if job.status in (JobStatus.queued, JobStatus.running):
        return job.status
    if job.status != JobStatus.succeeded or job.model_version_id is None or job.label is None:
        return None
    version = session.get(ModelVersion, job.model_version_id)
    if version is None:
        return None
    session.expunge(version)
    return PendingExplanation(job.id, job.input_key, as_utc(job.created_at), job.label, version)
