"""API keys and who a request acts for.

Keys are random 256-bit tokens shown once; only their sha256 is stored (a fast hash suits
high-entropy secrets; slow hashes exist for guessable passwords). Roles: `submit` (send images, read
own jobs and batches), `train` (datasets, training runs), `admin` (everything, every organisation,
key management). A client sees only what its own organisation submitted.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.db.models import ApiKey, as_utc, utcnow
from shared.schemas import ApiKeyView

ROLES = ("submit", "train", "admin")
BOOTSTRAP_ORGANISATION = "admin"
BOOTSTRAP_KEY_NAME = "bootstrap-admin"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for. `organisation` None means no scoping (open mode, or an admin)."""

    organisation: str | None
    roles: frozenset[str]
    key_id: str | None = None

    def has(self, role: str) -> bool:
        return role in self.roles or "admin" in self.roles

    @property
    def scope(self) -> str | None:
        """The organisation whose data this principal may see; None: all of it (admin, open mode)."""
        return None if self.organisation is None or "admin" in self.roles else self.organisation


OPEN = Principal(organisation=None, roles=frozenset(ROLES))


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(session: Session, settings: Settings, token: str | None) -> Principal:
    if not settings.auth_enabled:
        return OPEN
    if not token:
        raise XrayqError("unauthorized", "Send an API key: `Authorization: Bearer <key>`.")
    if settings.admin_key and hmac.compare_digest(token.encode(), settings.admin_key.encode()):
        return Principal(organisation=BOOTSTRAP_ORGANISATION, roles=frozenset({"admin"}))
    row = session.scalars(select(ApiKey).where(ApiKey.key_sha256 == hash_key(token))).first()
    if row is None or row.revoked_at is not None:
        raise XrayqError("unauthorized", "The API key is unknown or revoked.")
    return Principal(organisation=row.organisation, roles=frozenset(row.roles), key_id=row.id)


def require(principal: Principal, role: str) -> None:
    if not principal.has(role):
        raise XrayqError("forbidden", f"This API key lacks the '{role}' role.")


def create_key(session: Session, name: str, organisation: str, roles: list[str]) -> tuple[ApiKey, str]:
    """A new key; returns its row and the token, which is never stored and cannot be shown again."""
    unknown = sorted(set(roles) - set(ROLES))
    if not roles or unknown:
        raise XrayqError("invalid_parameter", f"Roles must be a non-empty subset of {list(ROLES)}; got {roles}.")
    if not name.strip() or not organisation.strip():
        raise XrayqError("invalid_parameter", "A key needs a name and an organisation.")
    prefix = secrets.token_hex(4)
    token = f"xq_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        name=name.strip(),
        organisation=organisation.strip(),
        roles=sorted(set(roles)),
        key_sha256=hash_key(token),
        key_prefix=f"xq_{prefix}",
    )
    session.add(row)
    session.flush()
    return row, token


def create_bootstrap_admin_key(session: Session, settings: Settings) -> str | None:
    """The first admin key of a new installation, or None when it needs none: keys are off, the
    operator set XRAYQ_ADMIN_KEY, or an active admin key exists. So it is made (and shown) once; if
    every admin key is revoked, the next call makes a new one, which is how a lost key is replaced."""
    if not settings.auth_enabled or settings.admin_key:
        return None
    if any("admin" in row.roles and row.revoked_at is None for row in list_keys(session)):
        return None
    _row, token = create_key(session, BOOTSTRAP_KEY_NAME, BOOTSTRAP_ORGANISATION, ["admin"])
    return token


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise XrayqError("api_key_not_found", f"No API key with id {key_id!r}.")
    row.revoked_at = row.revoked_at or utcnow()
    return row


def key_view(row: ApiKey) -> ApiKeyView:
    """A key as the API lists it: never the key itself."""
    return ApiKeyView(
        id=row.id,
        name=row.name,
        organisation=row.organisation,
        roles=list(row.roles),
        key_prefix=row.key_prefix,
        created_at=as_utc(row.created_at),
        revoked_at=as_utc(row.revoked_at),
    )
