"""Submitting images as one job or one batch, idempotent under an Idempotency-Key (see `shared.jobs.creation`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.core.settings import Settings
from shared.core.storage import ObjectStore
from shared.db.models import Batch, IdempotencyKey, Job, new_id
from shared.intake.upload import Upload
from shared.jobs.creation import Created, JobRequest, create_jobs
from shared.jobs.idempotency import (
    check_key,
    find_original,
    remember,
    request_fingerprint,
    scoped_key,
    upload_digests,
)

if TYPE_CHECKING:
    from celery import Celery


@dataclass
class Submitted:
    batch: Batch | None
    jobs: list[Job]
    replayed: bool = False  # True: an earlier request with the same Idempotency-Key created these


def submit_images(
    session: Session,
    store: ObjectStore,
    celery: Celery,
    settings: Settings,
    uploads: Iterable[Upload],
    *,
    model_ref: str,
    as_batch: bool,
    client_ref: str | None = None,
    idempotency_key: str | None = None,
    organisation: str | None = None,
    callback_url: str | None = None,
    callback_secret: str | None = None,
    explain: bool = False,
) -> Submitted:
    """The uploads' jobs (in a batch if `as_batch`), committed and published.

    `uploads` may be lazy (a batch's files, a ZIP's members, checked as they are taken): each is stored
    before the next is taken. A request under an Idempotency-Key already used is answered as the
    original (409 if its files or options differ); its files are hashed one by one, never stored.
    """
    kind = "batch" if as_batch else "job"
    if idempotency_key is not None:
        # Keys are per organisation: one client's key never finds (or blocks) another's jobs.
        idempotency_key = scoped_key(organisation, check_key(idempotency_key))
        if session.get(IdempotencyKey, idempotency_key) is not None:
            fingerprint = request_fingerprint(kind, model_ref, client_ref, upload_digests(uploads), explain=explain)
            original = find_original(session, idempotency_key, fingerprint)
            assert original is not None
            return _replay(session, original)
    request = JobRequest(uploads, model_ref, client_ref, organisation, pin_active_version=as_batch, explain=explain)
    batches: list[Batch] = []
    fingerprints: list[str] = []

    def arrange(session: Session, created: list[Created]) -> None:
        (made,) = created
        if as_batch:
            batches.append(_open_batch(session, made, callback_url, callback_secret))
        if idempotency_key is not None:
            # Of the files as they were stored: the rows carry each one's name and sha256.
            files = [(job.filename, job.input_sha256 or "") for job in made.jobs]  # every new row has one
            fingerprints.append(request_fingerprint(kind, model_ref, client_ref, files, explain=explain))
            resource, resource_id = ("batch", batches[0].id) if batches else ("job", made.jobs[0].id)
            remember(session, idempotency_key, fingerprints[0], resource, resource_id)

    try:
        created = create_jobs(
            session, store, celery, [request], chunk_size=settings.predict_chunk_size, arrange=arrange
        )[0]
    except IntegrityError:
        # A concurrent request with the same key committed first: answer as its replay.
        session.rollback()
        if idempotency_key is None or not fingerprints:
            raise
        original = find_original(session, idempotency_key, fingerprints[0])
        if original is None:
            raise
        return _replay(session, original)
    if created.error is not None:
        raise created.error
    return Submitted(batches[0] if batches else None, created.jobs)


def _open_batch(session: Session, made: Created, callback_url: str | None, callback_secret: str | None) -> Batch:
    """The batch holding the request's jobs, in their order."""
    batch = Batch(
        id=new_id(),
        model_name=made.model_name,
        total=len(made.jobs),
        client_ref=made.request.client_ref,
        organisation=made.request.organisation,
        callback_url=callback_url,
        callback_secret=callback_secret,
        result_pending=True if callback_url else None,  # the callback is sent once all jobs finish
    )
    session.add(batch)
    for job in made.jobs:
        job.batch_id = batch.id
    return batch


def _replay(session: Session, original: IdempotencyKey) -> Submitted:
    if original.resource == "batch":
        batch = session.get(Batch, original.resource_id)
        jobs = list(session.scalars(select(Job).where(Job.batch_id == original.resource_id).order_by(Job.position)))
        return Submitted(batch, jobs, replayed=True)
    job = session.get(Job, original.resource_id)
    return Submitted(None, [job] if job else [], replayed=True)
