"""Idempotent submissions: the same Idempotency-Key and request return the original ids, never new jobs.

The key's row is inserted in the same transaction as the jobs it created, so of two racing requests
with one key exactly one commits; the other sees the committed row and answers as a replay (or 409
when its request differs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.db.models import IdempotencyKey
from shared.intake.upload import Upload

MAX_KEY_LENGTH = 255


def check_key(key: str) -> str:
    if not 0 < len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        raise XrayqError("invalid_parameter", f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters.")
    return key


def request_fingerprint(
    kind: str, model_ref: str, client_ref: str | None, files: Iterable[tuple[str, str]], *, explain: bool = False
) -> str:
    """What makes two requests the same: their options and their files' names and sha256 (hex), in order."""
    digest = hashlib.sha256()
    for part in (kind, model_ref, client_ref or ""):
        digest.update(part.encode() + b"\0")
    if explain:  # only when asked: keys recorded before the option existed keep their fingerprints
        digest.update(b"explain\0")
    for filename, sha256 in files:
        digest.update(filename.encode() + b"\0" + bytes.fromhex(sha256))
    return digest.hexdigest()


def upload_digests(uploads: Iterable[Upload]) -> Iterator[tuple[str, str]]:
    return ((upload.filename, hashlib.sha256(upload.data).hexdigest()) for upload in uploads)


def find_original(session: Session, key: str, fingerprint: str) -> IdempotencyKey | None:
    """The earlier submission under `key`, if any; 409 if it was a different request."""
    row = session.get(IdempotencyKey, key)
    if row is not None and row.request_sha256 != fingerprint:
        raise XrayqError("idempotency_key_conflict", "This Idempotency-Key was already used with a different request.")
    return row


def remember(session: Session, key: str, fingerprint: str, resource: str, resource_id: str) -> None:
    session.add(IdempotencyKey(key=key, request_sha256=fingerprint, resource=resource, resource_id=resource_id))


def scoped_key(organisation: str | None, key: str) -> str:
    """The stored form of a client's key: a digest of organisation and key (fits the column, leaks neither)."""
    return hashlib.sha256(f"{organisation or ''}\0{key}".encode()).hexdigest()
