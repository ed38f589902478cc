"""The audit trail (role `admin` only): list with filters and a cursor, and verify its hash chain."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from services.gateway.access import GuardedRoute
from services.gateway.deps import PRINTABLE, AdminDep, SessionDep
from services.gateway.problems import PROBLEMS
from shared.audit import verify_chain
from shared.audit.fhir import fhir_bundle
from shared.audit.listing import AuditFilter, list_events
from shared.db.models import AuditEvent, as_utc
from shared.schemas import AuditChainCheck, AuditEventPage, AuditEventView

router = APIRouter(prefix="/v1/audit-events", tags=["audit"], route_class=GuardedRoute)


@router.get("", response_model=AuditEventPage, responses=PROBLEMS)
def list_audit_events(
    session: SessionDep,
    _: AdminDep,
    action: Annotated[str | None, Query(max_length=64, pattern=PRINTABLE, description="Only this action code.")] = None,
    organisation: Annotated[str | None, Query(max_length=128, pattern=PRINTABLE)] = None,
    entity_id: Annotated[str | None, Query(max_length=64, pattern=PRINTABLE)] = None,
    since: Annotated[datetime | None, Query(description="Occurred at or after (ISO 8601).")] = None,
    until: Annotated[datetime | None, Query(description="Occurred before (ISO 8601).")] = None,
    cursor: Annotated[int | None, Query(ge=0, description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditEventPage:
    """Security events, oldest first: who did what to which record, when, and with what outcome."""
    where = AuditFilter(action, organisation, entity_id, since, until)
    rows, next_cursor = list_events(session, where, cursor=cursor, limit=limit)
    return AuditEventPage(events=[_view(row) for row in rows], next_cursor=next_cursor)


@router.get("/fhir", responses=PROBLEMS)
def export_fhir(
    session: SessionDep,
    _: AdminDep,
    since: Annotated[datetime | None, Query(description="Occurred at or after (ISO 8601).")] = None,
    until: Annotated[datetime | None, Query(description="Occurred before (ISO 8601).")] = None,
    cursor: Annotated[int | None, Query(ge=0, description="The last sequence already exported.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> dict[str, Any]:
    """The events as a FHIR R4 Bundle of AuditEvent resources (IHE BALP style), oldest first."""
    rows, _next = list_events(session, AuditFilter(since=since, until=until), cursor=cursor, limit=limit)
    return fhir_bundle(rows)


@router.get("/verify", response_model=AuditChainCheck, responses=PROBLEMS)
def verify(session: SessionDep, _: AdminDep) -> AuditChainCheck:
    """Recompute the hash chain: ok, or the sequence of the first event that was changed or removed."""
    check = verify_chain(session)
    return AuditChainCheck(ok=check.ok, events=check.events, first_broken_sequence=check.first_broken)


def _view(row: AuditEvent) -> AuditEventView:
    return AuditEventView(
        id=row.id,
        sequence=row.sequence,
        occurred_at=as_utc(row.occurred_at),
        action=row.action,
        outcome=row.outcome,  # type: ignore[arg-type]  # only "success" or "failure" are recorded
        actor_key_id=row.actor_key_id,
        organisation=row.organisation,
        source_address=row.source_address,
        entity_type=row.entity_type,
        entity_id=row.entity_id,
        detail=row.detail,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )
