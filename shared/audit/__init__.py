"""The audit trail: security-relevant events recorded append-only in a hash chain (see recorder.py)."""

from datetime import timedelta

from shared.audit.recorder import Actor, purge_before, record, verify_chain
from shared.core.settings import Settings
from shared.db.models import utcnow
from shared.db.session import Database

__all__ = ["Actor", "purge_before", "purge_old_audit_events", "record", "verify_chain"]


def purge_old_audit_events(settings: Settings, database: Database) -> int:
    """The housekeeping pass's retention of the audit trail (`audit_retention_days`; 0: keep forever)."""
    if settings.audit_retention_days <= 0:
        return 0
    with database.session() as session:
        return purge_before(session, utcnow() - timedelta(days=settings.audit_retention_days))
