"""Lists of jobs and batches for a client, newest first, with the filters the API and dashboard offer.

Every query is scoped to the caller's organisation first (`Principal.scope`; None: all of them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import Select, exists, func, select
from sqlalchemy.orm import Session, selectinload

from shared.db.models import Batch, Job, JobStatus
from shared.jobs.views import batch_outline
from shared.schemas import BatchCounts, BatchSummary

BatchState = Literal["active", "finished"]


@dataclass(frozen=True)
class ListFilter:
    """What a list is narrowed to; None: anything."""

    model: str | None = None
    client_ref: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def list_jobs(
    session: Session,
    scope: str | None,
    where: ListFilter,
    *,
    status: str | None = None,
    batch_id: str | None = None,
    limit: int = 100,
) -> list[Job]:
    query = _narrowed(select(Job).options(selectinload(Job.model_version)), Job, scope, _stored(session, where))
    if status:
        query = query.where(Job.status == status)
    if batch_id:
        query = query.where(Job.batch_id == batch_id)
    return list(session.scalars(query.order_by(Job.created_at.desc(), Job.position).limit(limit)))


def list_batches(
    session: Session, scope: str | None, where: ListFilter, *, state: BatchState | None = None, limit: int = 50
) -> list[BatchSummary]:
    """`state`: `active` (a job still queued or running, or a study still collecting) or `finished`."""
    query = _narrowed(select(Batch), Batch, scope, _stored(session, where))
    unfinished = exists().where(Job.batch_id == Batch.id, Job.status.in_((JobStatus.queued, JobStatus.running)))
    active = unfinished | (Batch.study_instance_uid.is_not(None) & Batch.stable_at.is_(None))
    if state == "active":
        query = query.where(active)
    elif state == "finished":
        query = query.where(~active)
    batches = list(session.scalars(query.order_by(Batch.created_at.desc()).limit(limit)))
    counts: dict[str, dict[str, int]] = {batch.id: {} for batch in batches}
    if batches:
        rows = session.execute(
            select(Job.batch_id, Job.status, func.count())
            .where(Job.batch_id.in_(list(counts)))
            .group_by(Job.batch_id, Job.status)
        ).all()
        for batch_id, job_status, count in rows:
            counts[str(batch_id)][job_status.value] = count
    return [_summary(batch, BatchCounts(**counts[batch.id])) for batch in batches]


def _stored(session: Session, where: ListFilter) -> ListFilter:
    """Times as the database compares them: SQLite keeps naive UTC text, so a zone would compare wrong."""
    if session.get_bind().dialect.name != "sqlite":
        return where

    def naive(moment: datetime | None) -> datetime | None:
        if moment is None or moment.tzinfo is None:
            return moment
        try:
            return moment.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:  # year 1 east of UTC, year 9999 west of it: past either end anyway
            return datetime.min if moment.year == 1 else datetime.max

    return replace(where, created_after=naive(where.created_after), created_before=naive(where.created_before))


def _narrowed(query: Select, table: type[Job] | type[Batch], scope: str | None, where: ListFilter) -> Select:
    if scope is not None:
        query = query.where(table.organisation == scope)
    if where.model:
        query = query.where(table.model_name == where.model)
    if where.client_ref:
        query = query.where(table.client_ref == where.client_ref)
    if where.created_after:
        query = query.where(table.created_at >= where.created_after)
    if where.created_before:
        query = query.where(table.created_at < where.created_before)
    return query


def _summary(batch: Batch, counts: BatchCounts) -> BatchSummary:
    return BatchSummary(**batch_outline(batch, counts), study_instance_uid=batch.study_instance_uid)
