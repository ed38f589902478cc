"""Record security events in the transaction of the action they describe, and verify their chain.

Each row's `hash` is the sha256 of its canonical JSON (every recorded field, sorted keys) joined to the
previous row's hash, so changing, inserting or removing a row breaks the chain from that row on.
Writers are serialised while they read the chain's end and append to it: on Postgres by a
transaction-scoped advisory lock (released at commit or rollback, so a rolled-back action leaves no
event and no gap); SQLite allows one writer at a time anyway. The cost on the hot path: one lock, one
indexed read of the last row and one insert, in a transaction that commits anyway.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from shared.db.models import AuditEvent, as_utc, utcnow

GENESIS = "0" * 64  # the prev_hash of the first event ever recorded
# The advisory lock's key: any fixed number no other part of xrayq takes ("audit" in ASCII).
CHAIN_LOCK = 0x6175646974
Outcome = Literal["success", "failure"]


@dataclass(frozen=True)
class Actor:
    """Who acted: the key (None: bootstrap admin, open mode or unknown), its organisation, its address."""

    key_id: str | None = None
    organisation: str | None = None
    address: str | None = None


def record(
    session: Session,
    action: str,
    actor: Actor,
    *,
    outcome: Outcome = "success",
    entity_type: str | None = None,
    entity_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain in `session`'s transaction; it commits (or not) with the action."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK})
    last = session.execute(
        select(AuditEvent.sequence, AuditEvent.hash).order_by(AuditEvent.sequence.desc()).limit(1)
    ).first()
    sequence, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS)
    event = AuditEvent(
        sequence=sequence,
        occurred_at=utcnow(),
        action=action,
        outcome=outcome,
        actor_key_id=actor.key_id,
        organisation=actor.organisation,
        source_address=actor.address,
        entity_type=entity_type,
        entity_id=entity_id,
        detail=detail,
        prev_hash=prev_hash,
    )
    event.hash = event_hash(event)
    session.add(event)
    session.flush()
    return event


def event_hash(event: AuditEvent) -> str:
    canonical = json.dumps(
        {
            "sequence": event.sequence,
            "occurred_at": as_utc(event.occurred_at).isoformat(timespec="microseconds"),
            "action": event.action,
            "outcome": event.outcome,
            "actor_key_id": event.actor_key_id,
            "organisation": event.organisation,
            "source_address": event.source_address,
            "entity_type": event.entity_type,
            "entity_id": event.entity_id,
            "detail": event.detail,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256((event.prev_hash + canonical).encode()).hexdigest()


@dataclass(frozen=True)
class ChainCheck:
    """`first_broken`: the sequence of the first event whose hash, link or number does not hold (None: ok)."""

    events: int
    first_broken: int | None

    @property
    def ok(self) -> bool:
        return self.first_broken is None


def verify_chain(session: Session, page: int = 1000) -> ChainCheck:
    """Walk the chain in order, a page at a time, recomputing each hash. The first row's prev_hash is
    taken as the chain's start (the genesis, or the last hash a retention purge removed); every later
    row must link to the one before it, with the next sequence number."""
    checked = 0
    previous: AuditEvent | None = None
    while True:
        query = select(AuditEvent).order_by(AuditEvent.sequence).limit(page)
        if previous is not None:
            query = query.where(AuditEvent.sequence > previous.sequence)
        rows = list(session.scalars(query))
        for row in rows:
            linked = previous is None or (row.prev_hash == previous.hash and row.sequence == previous.sequence + 1)
            if not linked or event_hash(row) != row.hash:
                return ChainCheck(checked, row.sequence)
            checked += 1
            previous = row
        if len(rows) < page:
            return ChainCheck(checked, None)


def purge_before(session: Session, cutoff: datetime) -> int:
    """Delete the events that occurred before `cutoff`, as a prefix of the chain: everything up to the
    last such sequence, so no hole opens. The oldest remaining row's prev_hash is then the chain's start
    (`verify_chain` takes it as given). Returns how many were deleted."""
    if session.get_bind().dialect.name == "postgresql":  # not while a writer appends
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK})
    last = session.scalar(select(func.max(AuditEvent.sequence)).where(AuditEvent.occurred_at < cutoff))
    if last is None:
        return 0
    return session.execute(delete(AuditEvent).where(AuditEvent.sequence <= last)).rowcount  # type: ignore[attr-defined]
