"""Writing a backup: the database snapshot first, then every object of the store, then the manifest."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from shared.backup.container import BackupWriter, open_writer
from shared.backup.database import current_revision, database_kind, dump_postgres, dump_sqlite
from shared.backup.manifest import DATABASE_FILE, DatabaseEntry, Manifest, ObjectEntry, object_file
from shared.core.settings import Settings
from shared.core.storage import ObjectNotFound, ObjectStore, make_object_store


@dataclass(frozen=True)
class BackupSummary:
    destination: Path
    manifest: Manifest
    vanished: int  # objects listed, then deleted (the retention purge) before they could be copied


def create_backup(settings: Settings, destination: Path, store: ObjectStore | None = None) -> BackupSummary:
    store = store or make_object_store(settings)
    writer = open_writer(destination)
    try:
        database = _add_database(settings, writer)
        objects: list[ObjectEntry] = []
        vanished = 0
        for listed in store.list_objects():
            name = object_file(len(objects))
            try:
                with store.open_object(listed.key) as reader:
                    stored = writer.add(name, reader.body, reader.size)
                    content_type = reader.content_type
            except ObjectNotFound:
                vanished += 1
                continue
            objects.append(ObjectEntry(**stored.model_dump(), key=listed.key, content_type=content_type))
        manifest = Manifest(
            created_at=datetime.now(UTC),
            xrayq_version=_version(),
            database=database,
            objects=objects,
            object_count=len(objects),
            object_bytes=sum(entry.size for entry in objects),
        )
        writer.finish(manifest.to_bytes())
    except BaseException:
        writer.abandon()
        raise
    return BackupSummary(destination, manifest, vanished)


def _add_database(settings: Settings, writer: BackupWriter) -> DatabaseEntry:
    kind = database_kind(settings)
    revision = current_revision(settings.database_url)
    with tempfile.TemporaryDirectory(prefix="xrayq-backup-") as scratch:
        dump = Path(scratch) / DATABASE_FILE[kind]
        if kind == "postgresql":
            tool = dump_postgres(settings.database_url, dump)
        else:
            tool = dump_sqlite(settings.database_url, dump)
        with dump.open("rb") as handle:
            stored = writer.add(DATABASE_FILE[kind], handle, dump.stat().st_size)
    return DatabaseEntry(**stored.model_dump(), kind=kind, alembic_revision=revision, tool=tool)


def _version() -> str:
    try:
        return metadata.version("xrayq")
    except metadata.PackageNotFoundError:
        return "unknown"
