"""Study batches: the instances of one study become one batch, however and whenever they arrive.

A study is keyed by the submitting organisation, its StudyInstanceUID and its AccessionNumber. The
first instance opens a batch; later ones -- from the same request, another request, another DICOM
association -- join it while it is open. Once no instance has arrived for `study_stable_after_s` the
batch is sealed (Orthanc's "stable study", MONAI Deploy's grouping timeout), and when its jobs are all
finished its result is built and sent (see `shared.jobs.deliveries`). An instance arriving after the seal
opens a new batch for the same study: its result follows separately, as a PACS expects of late images.

The same functions serve DIMSE C-STORE, STOW-RS and REST; each only translates its protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectStore
from shared.db.models import Batch, Job, utcnow
from shared.intake.upload import Upload
from shared.jobs.creation import Created, JobRequest, create_jobs
from shared.models.registry import resolve_version

if TYPE_CHECKING:
    from celery import Celery


@dataclass
class StudyIntake:
    """What one request or association's instances became."""

    batches: list[Batch] = field(default_factory=list)
    jobs: dict[str, list[Job]] = field(default_factory=dict)  # batch id -> its jobs added now
    duplicates: list[Upload] = field(default_factory=list)  # already in their open study batch


def _study_version(session: Session, batch_id: str, name: str) -> int:
    earlier = session.scalars(
        select(Job.model_version_requested).where(Job.batch_id == batch_id, Job.model_version_requested.is_not(None))
    ).first()
    return earlier if earlier is not None else resolve_version(session, name).version


def study_key(organisation: str | None, study_uid: str, accession: str) -> str:
    return f"{organisation or ''}|{study_uid}|{accession}"


def add_instances(
    session: Session,
    store: ObjectStore,
    celery: Celery,
    settings: Settings,
    uploads: Sequence[Upload],
    *,
    organisation: str | None,
    source: str,
    model_ref: str,
    callback_url: str | None = None,
    callback_secret: str | None = None,
) -> StudyIntake:
    """Add checked instances (`shared.intake.instances.check_instance`) to their open study batches,
    commit, publish.

    Bytes are stored before any row is written, so the open batch is locked only briefly. An instance
    whose SOPInstanceUID is already in its open batch (a sender's retry) is not classified twice.
    """
    intake = StudyIntake()
    studies: dict[tuple[str, str], list[Upload]] = {}
    for upload in uploads:
        tags = upload.dicom or {}
        studies.setdefault((tags["StudyInstanceUID"], tags.get("AccessionNumber", "")), []).append(upload)
    requests = [
        JobRequest(members, model_ref, client_ref=accession or None, organisation=organisation)
        for (_, accession), members in studies.items()
    ]

    def arrange(session: Session, created: list[Created]) -> None:
        for study in created:
            batch = _join_study(session, store, intake, study, source)
            if callback_url:
                batch.callback_url, batch.callback_secret = callback_url, callback_secret

    outcomes = create_jobs(session, store, celery, requests, chunk_size=settings.predict_chunk_size, arrange=arrange)
    if outcomes and outcomes[0].error is not None:  # one model for all: refused for all
        raise outcomes[0].error
    return intake


def _join_study(session: Session, store: ObjectStore, intake: StudyIntake, study: Created, source: str) -> Batch:
    """Put one study's new jobs into its open batch, leaving out instances the batch already has."""
    members, jobs = study.request.uploads, study.jobs
    tags = members[0].dicom or {}
    study_uid, accession = tags["StudyInstanceUID"], tags.get("AccessionNumber", "")
    batch, first = _reserve(
        session, study.request.organisation, study_uid, accession, len(jobs), study.model_name, source
    )
    # One version answers a whole study, even when a promotion lands between its instances: the
    # one active when its first instance arrived.
    requested = jobs[0].model_version_requested
    pinned = requested if requested is not None else _study_version(session, batch.id, study.model_name)
    present = _instances_in(session, batch.id)
    fresh: list[Job] = []
    for job, upload in zip(jobs, members, strict=True):
        sop = (upload.dicom or {}).get("SOPInstanceUID")
        if sop in present:
            intake.duplicates.append(upload)
            if job.input_key:
                store.delete(job.input_key)
            continue
        present.add(sop)
        job.model_version_requested = pinned
        job.batch_id, job.position = batch.id, first + len(fresh)
        fresh.append(job)
    if len(fresh) < len(jobs):
        batch.total -= len(jobs) - len(fresh)
    study.jobs = fresh
    intake.batches.append(batch)
    intake.jobs[batch.id] = fresh
    return batch


def _reserve(
    session: Session,
    organisation: str | None,
    study_uid: str,
    accession: str,
    count: int,
    model_name: str,
    source: str,
) -> tuple[Batch, int]:
    """The study's open batch with `count` more places (and its first new position), opened if need be.

    One UPDATE finds, extends and locks the open batch; the unique `open_study_key` makes two
    concurrent first arrivals agree on one batch.
    """
    key = study_key(organisation, study_uid, accession)
    for _ in range(5):
        now = utcnow()
        row = session.execute(
            update(Batch)
            .where(Batch.open_study_key == key)
            .values(total=Batch.total + count, last_instance_at=now)
            .returning(Batch.id, Batch.total)
        ).first()
        if row is not None:
            batch = session.get(Batch, row.id, populate_existing=True)
            assert batch is not None
            return batch, row.total - count
        batch = Batch(
            model_name=model_name,
            total=count,
            client_ref=accession or None,
            organisation=organisation,
            study_instance_uid=study_uid,
            accession_number=accession or None,
            source=source,
            open_study_key=key,
            last_instance_at=now,
            result_pending=True,
        )
        try:
            with session.begin_nested():
                session.add(batch)
                session.flush()
        except IntegrityError:
            continue  # another arrival opened it first: join that one
        return batch, 0
    raise XrayqError("internal_error", "Could not open or join the study batch.")


def _instances_in(session: Session, batch_id: str) -> set[str | None]:
    return {
        (tags or {}).get("SOPInstanceUID")
        for tags in session.scalars(select(Job.dicom).where(Job.batch_id == batch_id))
    }


def seal_stable_studies(session: Session, settings: Settings) -> int:
    """Close the study batches that took no instance for `study_stable_after_s`; returns how many."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.study_stable_after_s)
    result = session.execute(
        update(Batch)
        .where(Batch.open_study_key.is_not(None), Batch.last_instance_at <= cutoff)
        .values(open_study_key=None, stable_at=now)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def study_batch_ids(session: Session, study_uid: str, organisation: str | None = None) -> list[str]:
    query = select(Batch.id).where(Batch.study_instance_uid == study_uid)
    if organisation is not None:
        query = query.where(Batch.organisation == organisation)
    return list(session.scalars(query.order_by(Batch.created_at)))
