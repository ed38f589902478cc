"""What a backup holds, written last into it: the database dump and every object, each with its size and
sha256, so a restore can prove every byte before it writes anything."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from shared.core.errors import XrayqError

MANIFEST_NAME = "manifest.json"
FORMAT: Literal[1] = 1
# Names of the files inside a backup: fixed, never derived from an object key, so no key can make a
# restore read outside the backup.
DATABASE_FILE = {"postgresql": "database.pgdump", "sqlite": "database.sqlite3"}
_OBJECT_FILE = re.compile(r"objects/\d{8,}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def object_file(index: int) -> str:
    return f"objects/{index:08d}"


class StoredFile(BaseModel):
    file: str
    size: int = Field(ge=0)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _is_hex_digest(cls, value: str) -> str:
        if not _SHA256.fullmatch(value):
            raise ValueError("not a sha256 hex digest")
        return value


class DatabaseEntry(StoredFile):
    kind: Literal["postgresql", "sqlite"]
    # The schema's Alembic revision at the snapshot: a restore runs the migrations after it forward.
    alembic_revision: str
    tool: str  # pg_dump's version line, or the SQLite library's version

    @field_validator("file")
    @classmethod
    def _is_database_file(cls, value: str) -> str:
        if value not in DATABASE_FILE.values():
            raise ValueError(f"unexpected database file name {value!r}")
        return value


class ObjectEntry(StoredFile):
    key: str = Field(min_length=1)
    content_type: str

    @field_validator("file")
    @classmethod
    def _is_object_file(cls, value: str) -> str:
        if not _OBJECT_FILE.fullmatch(value):
            raise ValueError(f"unexpected object file name {value!r}")
        return value


class Manifest(BaseModel):
    format: Literal[1] = FORMAT
    created_at: datetime
    xrayq_version: str
    database: DatabaseEntry
    objects: list[ObjectEntry]
    object_count: int
    object_bytes: int

    def files(self) -> list[StoredFile]:
        return [self.database, *self.objects]

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as exc:
            raise XrayqError("backup_invalid", f"the backup's manifest is not one xrayq wrote: {exc}") from None
        if manifest.object_count != len(manifest.objects) or len({o.key for o in manifest.objects}) != len(
            manifest.objects
        ):
            raise XrayqError("backup_invalid", "the backup's manifest does not add up (object count or keys)")
        return manifest
