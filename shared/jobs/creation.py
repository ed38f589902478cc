"""Making jobs: the one path every submission takes -- single images (the gateway's group commit),
batches, and study instances (REST, STOW-RS, C-STORE).

Check the model, make the rows while storing each accepted input as it comes, let the caller place the
rows (in a batch, a study, under an idempotency key), commit, then publish. Every input is stored before
anything is committed, so a committed row always finds its bytes; rows are committed before their ids
are published, so a worker never gets an id it cannot see.

Uploads may be a lazy iterable (a ZIP's members, a request's files, checked one by one as they are
taken): each is stored and let go before the next is taken, so a batch of any size is held one image at
a time. A failure part-way (a put, the arrangement, the commit) commits nothing; inputs already stored
are left unreferenced under keys no row names, which nothing reads -- the price of never letting a row
point at missing bytes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.parallel_puts import STREAM_IN_FLIGHT_BYTES, ParallelPuts
from shared.core.storage import ObjectStore
from shared.db.models import ExplanationStatus, Job, JobStatus, new_id, utcnow
from shared.intake.upload import Upload
from shared.jobs.lifecycle import commit_then_publish
from shared.models.ownership import check_may_use
from shared.models.registry import parse_model_ref, resolve_version

if TYPE_CHECKING:
    from celery import Celery


@dataclass
class JobRequest:
    """Uploads to be answered together by one model, on behalf of one client.

    `uploads` is taken once, in order, and only if the model can answer: a lazy iterable is never held
    whole."""

    uploads: Iterable[Upload]
    model_ref: str
    client_ref: str | None = None
    organisation: str | None = None
    # Answer every job with the version active now, even if another is promoted while they wait (a batch).
    pin_active_version: bool = False
    # Explain each answer too (a Grad-CAM heatmap, made by the worker right after it: `shared.jobs.explanations`).
    explain: bool = False


@dataclass
class Created:
    """A request's new jobs (positions 0..n-1, no batch yet), or why none were made."""

    request: JobRequest
    model_name: str = ""
    jobs: list[Job] = field(default_factory=list)
    error: XrayqError | None = None


# Places the accepted requests' rows before the commit: opens their batch, joins their study, records an
# idempotency key. It may drop jobs from `Created.jobs` (a study's duplicate instances); those are not kept.
Arrange = Callable[[Session, list[Created]], None]


def create_jobs(
    session: Session,
    store: ObjectStore,
    celery: Celery,
    requests: Sequence[JobRequest],
    *,
    chunk_size: int,
    arrange: Arrange | None = None,
    in_flight_bytes: int | None = STREAM_IN_FLIGHT_BYTES,
) -> list[Created]:
    """Make, store, commit and publish the jobs of every request; one outcome per request, in order.

    A request whose model cannot answer (unknown name or version, no active version, another
    organisation's model) gets that error and no jobs; the others go on. Uploads that were refused
    (`error` set) become failed jobs at once: they keep their place and name, and never reach a worker;
    nothing of them is stored. Accepted inputs are stored in parallel as they are taken, at most
    `in_flight_bytes` of them at once (None: no bound, for uploads the caller holds in memory anyway);
    once all are stored, all rows are committed in one transaction and their ids published together,
    in chunks of `chunk_size`.
    """
    # Per reference and organisation: one group holds several organisations' requests.
    models: dict[tuple[str, str | None], tuple[str, int | None, int] | XrayqError] = {}
    outcomes: list[Created] = []
    with ParallelPuts(store, in_flight_bytes) as puts:
        for request in requests:
            outcomes.append(_created(session, request, models, puts))
        accepted = [outcome for outcome in outcomes if outcome.error is None]
        if not accepted:
            return outcomes
        puts.wait()  # every input stored before any row is committed
    if arrange is not None:
        arrange(session, accepted)
    jobs = [job for outcome in accepted for job in outcome.jobs]
    session.add_all(jobs)
    commit_then_publish(session, celery, [job.id for job in jobs if job.input_key], chunk_size)
    return outcomes


def _created(
    session: Session,
    request: JobRequest,
    models: dict[tuple[str, str | None], tuple[str, int | None, int] | XrayqError],
    puts: ParallelPuts,
) -> Created:
    """The request's jobs, its inputs handed to `puts`; or, when no model can answer it, its error."""
    asked = (request.model_ref, request.organisation)
    if asked not in models:
        try:
            models[asked] = _answering_model(session, request.model_ref, request.organisation)
        except XrayqError as error:
            models[asked] = error
    model = models[asked]
    if isinstance(model, XrayqError):
        return Created(request, error=model)
    name, requested, resolved = model
    return Created(request, name, _new_jobs(request, name, resolved if request.pin_active_version else requested, puts))


def _answering_model(session: Session, model_ref: str, organisation: str | None) -> tuple[str, int | None, int]:
    """Refuse submissions no model could answer. The name, the version asked for (None: whichever is
    active when a worker takes the job), and the version that would answer now.

    Jobs run under their organisation: shared models and its own; another organisation's model
    answers as missing (no submission path can tell it exists). No organisation (the open mode): any.
    """
    name, version = parse_model_ref(model_ref)
    check_may_use(session, name, organisation)
    return name, version, resolve_version(session, name, version).version


def _new_jobs(request: JobRequest, model_name: str, model_version: int | None, puts: ParallelPuts) -> list[Job]:
    """Job rows for the request's uploads (not yet added to a session), taken one at a time: each
    accepted input goes to `puts` at once, and only its size and digest stay (in its row)."""
    now = utcnow()
    jobs = []
    for position, upload in enumerate(request.uploads):
        job = Job(
            id=new_id(),
            position=position,
            filename=upload.filename,
            media_type=upload.media_type or "application/octet-stream",
            input_bytes=len(upload.data),
            input_sha256=hashlib.sha256(upload.data).hexdigest(),
            client_ref=request.client_ref,
            organisation=request.organisation,
            model_name=model_name,
            model_version_requested=model_version,
            dicom=upload.dicom,
            attempts=0,
            created_at=now,
        )
        if upload.error is not None:
            job.status = JobStatus.failed
            job.error_code = upload.error.code
            job.error_detail = upload.error.detail
            job.finished_at = now
        else:
            job.status = JobStatus.queued
            job.input_key = f"inputs/{now:%Y/%m/%d}/{job.id}"
            if request.explain:
                job.explanation_status = ExplanationStatus.pending
                job.explanation = {"requested_at": time.time()}
            puts.put(job.input_key, upload.data, job.media_type)
        jobs.append(job)
    return jobs
