"""Restoring a backup into a fresh database and object store: every byte checked against the manifest
before anything is written, then the database, then the objects, then the migrations run forward."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError

from shared.backup.container import BackupReader, HashingReader, check_digest
from shared.backup.database import (
    clear_postgres,
    database_kind,
    holds_rows,
    restore_postgres,
    restore_sqlite,
    sqlite_path,
)
from shared.backup.manifest import Manifest
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectStore, S3ObjectStore, StoredObject, make_object_store
from shared.db.migrate import head_revision, is_known_revision, upgrade_database


@dataclass(frozen=True)
class RestoreSummary:
    manifest: Manifest
    migrated_to: str | None  # the revision the migrations brought an older backup to; None: already current
    dry_run: bool


def restore_backup(
    settings: Settings, source: Path, *, force: bool = False, dry_run: bool = False, store: ObjectStore | None = None
) -> RestoreSummary:
    """Restores `source` (a backup folder or .tar) into the settings' database and store.

    A target that holds data is refused unless `force` (its database is then emptied first; its objects
    are overwritten key by key, others left in place). `dry_run` checks the backup and the target only."""
    reader = BackupReader(source)
    try:
        manifest = Manifest.from_bytes(reader.read_manifest())
        _check_compatible(settings, manifest)
        store = store or make_object_store(settings)
        if not force:
            _check_target_is_fresh(settings, store)
        for entry in manifest.files():
            reader.verify(entry)
        if dry_run:
            return RestoreSummary(manifest, None, dry_run=True)
        _restore_database(settings, reader, manifest)
        _restore_objects(reader, manifest, store)
    finally:
        reader.close()
    migrated_to = None
    if manifest.database.alembic_revision != head_revision():
        upgrade_database(settings)
        migrated_to = head_revision()
    return RestoreSummary(manifest, migrated_to, dry_run=False)


def _check_compatible(settings: Settings, manifest: Manifest) -> None:
    kind = database_kind(settings)
    if manifest.database.kind != kind:
        raise XrayqError(
            "backup_mode_mismatch",
            f"the backup holds a {manifest.database.kind} database and the target is {kind}:"
            " restore it with the settings of the mode it was taken in",
        )
    if not is_known_revision(manifest.database.alembic_revision):
        raise XrayqError(
            "backup_newer_than_code",
            f"the backup's schema revision {manifest.database.alembic_revision} is unknown to this xrayq"
            f" (newest {head_revision()}): restore it with xrayq {manifest.xrayq_version}, which wrote it, or later",
        )


def _check_target_is_fresh(settings: Settings, store: ObjectStore) -> None:
    absent = settings.uses_sqlite and not sqlite_path(settings.database_url).exists()
    if not absent and holds_rows(settings.database_url):
        raise XrayqError(
            "backup_target_not_empty",
            "the target database holds data: restore into a fresh database, or pass --force to replace it",
        )
    if _first_object(store) is not None:
        raise XrayqError(
            "backup_target_not_empty",
            "the target object store holds objects: restore into a fresh bucket or folder, or pass --force",
        )


def _first_object(store: ObjectStore) -> StoredObject | None:
    try:
        return next(iter(store.list_objects()), None)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
            return None  # created by the restore itself
        raise


def _restore_database(settings: Settings, reader: BackupReader, manifest: Manifest) -> None:
    entry = manifest.database
    with tempfile.TemporaryDirectory(prefix="xrayq-restore-") as scratch:
        dump = Path(scratch) / entry.file
        with reader.open(entry.file) as handle, dump.open("wb") as out:
            hashing = HashingReader(handle)
            shutil.copyfileobj(hashing, out, 1024 * 1024)  # type: ignore[misc]
        check_digest(entry, hashing)  # again: the backup may have changed since it was verified
        if entry.kind == "postgresql":
            # Emptied even when fresh: a migrated schema without rows (`xrayq migrate` ran) counts as fresh.
            clear_postgres(settings.database_url)
            restore_postgres(settings.database_url, dump)
        else:
            restore_sqlite(settings.database_url, dump)


def _restore_objects(reader: BackupReader, manifest: Manifest, store: ObjectStore) -> None:
    if isinstance(store, S3ObjectStore):
        store.ensure_bucket()
    for entry in manifest.objects:
        with reader.open(entry.file) as handle:
            hashing = HashingReader(handle)
            store.put_stream(entry.key, hashing, entry.content_type)  # type: ignore[arg-type]
        # Checked before this restore began; a file changed since then is refused here, its object deleted.
        try:
            check_digest(entry, hashing)
        except XrayqError:
            store.delete(entry.key)
            raise
