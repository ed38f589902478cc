"""Browser sessions: a web page exchanges an API key once for a short-lived, random session token.

The page keeps the token in an HttpOnly cookie, so no script on the page can read it, and the key
itself is never stored by the browser at all. Only the token's sha256 is stored here. A session acts
for the key it was opened with, and ends when it expires, when it is closed, or when that key is
revoked (each lookup reads the key's row again). State changes made with the cookie must also carry
the session's CSRF token, which is derived from the session token and so known only to pages the
gateway rendered for that session (see services/gateway/access.py).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from shared.auth import BOOTSTRAP_ORGANISATION, Principal, hash_key
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.db.models import ApiKey, BrowserSession, as_utc, utcnow

EXPIRED = "The session has ended: sign in with your API key again."


def open_session(session: Session, settings: Settings, principal: Principal, key: str) -> tuple[str, datetime]:
    """A new session for `principal`, who authenticated with `key`: the token (shown once) and its expiry."""
    now = utcnow()
    session.execute(delete(BrowserSession).where(BrowserSession.expires_at < now))  # keep the table small
    token = secrets.token_urlsafe(32)
    expires_at = now + timedelta(seconds=settings.session_ttl_s)
    session.add(
        BrowserSession(
            token_sha256=hash_key(token),
            api_key_id=principal.key_id,
            bootstrap_key_sha256=hash_key(key) if principal.key_id is None else None,
            created_at=now,
            expires_at=expires_at,
        )
    )
    return token, expires_at


def session_principal(session: Session, settings: Settings, token: str) -> tuple[Principal, datetime]:
    """Who an open session acts for, and until when; 401 `session_expired` for any other token."""
    row = session.get(BrowserSession, hash_key(token))
    if row is None or as_utc(row.expires_at) <= utcnow():
        raise XrayqError("session_expired", EXPIRED)
    if row.api_key_id is not None:
        key = session.get(ApiKey, row.api_key_id)
        if key is None or key.revoked_at is not None:
            raise XrayqError("session_expired", EXPIRED)
        principal = Principal(organisation=key.organisation, roles=frozenset(key.roles), key_id=key.id)
    else:
        admin_key = settings.admin_key
        if not admin_key or not hmac.compare_digest(hash_key(admin_key), row.bootstrap_key_sha256 or ""):
            raise XrayqError("session_expired", EXPIRED)
        principal = Principal(organisation=BOOTSTRAP_ORGANISATION, roles=frozenset({"admin"}))
    return principal, as_utc(row.expires_at)


def close_session(session: Session, token: str) -> None:
    session.execute(delete(BrowserSession).where(BrowserSession.token_sha256 == hash_key(token)))


def csrf_token(token: str) -> str:
    """The token a page sends back with each state change: keyed by the session token, which a page of
    another site cannot read, so it cannot compute this either."""
    return hmac.new(token.encode(), b"xrayq-csrf", hashlib.sha256).hexdigest()


def csrf_matches(token: str, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(csrf_token(token), sent)
