"""The audit trail as an admin reads it: oldest first, narrowed by filters, a page at a time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import AuditEvent


@dataclass(frozen=True)
class AuditFilter:
    """What the trail is narrowed to; None: anything. `since` inclusive, `until` exclusive."""

    action: str | None = None
    organisation: str | None = None
    entity_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def list_events(
    session: Session, where: AuditFilter, *, cursor: int | None, limit: int
) -> tuple[list[AuditEvent], int | None]:
    """A page of events after sequence `cursor`, and the cursor of the next page (None: this was the last).

    The cursor is a sequence number: stable while events are appended, unlike an offset."""
    query = select(AuditEvent).order_by(AuditEvent.sequence).limit(limit + 1)
    if cursor is not None:
        query = query.where(AuditEvent.sequence > cursor)
    if where.action:
        query = query.where(AuditEvent.action == where.action)
    if where.organisation:
        query = query.where(AuditEvent.organisation == where.organisation)
    if where.entity_id:
        query = query.where(AuditEvent.entity_id == where.entity_id)
    if where.since:
        query = query.where(AuditEvent.occurred_at >= where.since)
    if where.until:
        query = query.where(AuditEvent.occurred_at < where.until)
    rows = list(session.scalars(query))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].sequence if more else None)
