"""Bring the backends to a usable state: schema migrated, bucket present. Idempotent and quick."""

from __future__ import annotations

from shared.core.settings import Settings
from shared.core.storage import S3ObjectStore
from shared.db.migrate import upgrade_database


def prepare_backends(settings: Settings) -> None:
    upgrade_database(settings)
    if settings.uses_s3:
        S3ObjectStore(settings).ensure_bucket()
