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

from collections.abc import Iterable
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
    duplicates: list[str] = field(default_factory=list)  # file names of instances already in their study


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
    uploads: Iterable[Upload],
    *,
    organisation: str | None,
    source: str,
    model_ref: str,
    callback_url: str | None = None,
    callback_secret: str | None = None,
    explain: bool = False,
) -> StudyIntake:
    """Add checked instances (`shared.intake.instances.check_instance`) to their open study batches,
    commit, publish.

    `uploads` may be lazy: each instance is stored as it is taken, and its study found from its tags
    once all are stored, so the open batch is locked only briefly and a request's instances are never
    all in memory. An instance whose SOPInstanceUID is already in its open batch (a sender's retry) is
    not classified twice.
    """
    intake = StudyIntake()

    def arrange(session: Session, created: list[Created]) -> None:
        (made,) = created
        studies: dict[tuple[str, str], list[Job]] = {}
        for job in made.jobs:
            tags = job.dicom or {}
            studies.setdefault((tags["StudyInstanceUID"], tags.get("AccessionNumber", "")), []).append(job)
        made.jobs = []
        for (study_uid, accession), jobs in studies.items():
            for job in jobs:
                job.client_ref = accession or None
            batch = _join_study(session, store, intake, made, study_uid, accession, jobs, source)
            if callback_url:
                batch.callback_url, batch.callback_secret = callback_url, callback_secret

    request = JobRequest(uploads, model_ref, organisation=organisation, explain=explain)
    (outcome,) = create_jobs(session, store, celery, [request], chunk_size=settings.predict_chunk_size, arrange=arrange)
    if outcome.error is not None:
        raise outcome.error
    return intake


def _join_study(
    session: Session,
    store: ObjectStore,
    intake: StudyIntake,
    made: Created,
    study_uid: str,
    accession: str,
    jobs: list[Job],
    source: str,
) -> Batch:
    """Put one study's new jobs into its open batch, leaving out instances the batch already has; the
    jobs kept are added to `made.jobs`."""
    organisation, name = made.request.organisation, made.model_name
    batch, first = _reserve(session, organisation, study_uid, accession, len(jobs), name, source)
    # One version answers a whole study, even when a promotion lands between its instances: the
    # one active when its first instance arrived.
    requested = jobs[0].model_version_requested
    pinned = requested if requested is not None else _study_version(session, batch.id, name)
    present = _instances_in(session, batch.id)
    fresh: list[Job] = []
    for job in jobs:
        sop = (job.dicom or {}).get("SOPInstanceUID")
        if sop in present:
            intake.duplicates.append(job.filename)
            if job.input_key:
                store.delete(job.input_key)
            continue
        present.add(sop)
        job.model_version_requested = pinned
        job.batch_id, job.position = batch.id, first + len(fresh)
        fresh.append(job)
    if len(fresh) < len(jobs):
        batch.total -= len(jobs) - len(fresh)
    made.jobs += fresh
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
