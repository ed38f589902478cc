"""HMAC-signed callbacks: a batch's result POSTed to the URL its client registered.

The signature header is `X-Xrayq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
(the scheme Stripe and others use): the receiver recomputes it over the raw body with its secret,
compares in constant time, and refuses stale timestamps, so a captured callback cannot be replayed
later. `X-Xrayq-Delivery` is the same on every retry of one delivery: receivers deduplicate on it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.core.errors import XrayqError
from shared.core.settings import Settings

SIGNATURE_HEADER = "X-Xrayq-Signature"
DELIVERY_HEADER = "X-Xrayq-Delivery"
EVENT_HEADER = "X-Xrayq-Event"
MIN_SECRET_LENGTH = 16


def signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: str, header: str, body: bytes, tolerance_s: float = 300, now: float | None = None) -> bool:
    """What a receiver does: the signature matches this body and is recent."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def check_callback(url: str | None, secret: str | None, settings: Settings) -> tuple[str | None, str | None]:
    """A registrable (url, secret): http(s) with a host, and a secret of the request's own or the
    server's `XRAYQ_CALLBACK_SECRET`. No URL: (None, None)."""
    if not url:
        if secret:
            raise XrayqError("invalid_callback", "`callback_secret` without a `callback_url`.")
        return None, None
    check_callback_url(url)
    secret = secret or settings.callback_secret
    if not secret or len(secret) < MIN_SECRET_LENGTH:
        raise XrayqError(
            "invalid_callback",
            f"A callback needs a `callback_secret` of at least {MIN_SECRET_LENGTH} characters to sign it with.",
        )
    return url, secret


def check_callback_url(url: str) -> None:
    """An http(s) URL that can be sent to: refused now, never a delivery that fails on every retry.

    `urlsplit` alone takes URLs no HTTP client can send to: an unclosed IPv6 bracket, a space or a
    control character in the host, a port past 65535, a host name DNS cannot carry."""
    invalid = XrayqError("invalid_callback", "`callback_url` must be an http(s) URL with a host.")
    if len(url) > 2048 or any(not ch.isprintable() or ch.isspace() for ch in url):
        raise invalid
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError when it is not 0-65535)
        httpx.URL(url)
        host = (parts.hostname or "").encode("idna")  # a label over 63 characters, an empty label: UnicodeError
    except (ValueError, httpx.InvalidURL):  # UnicodeError is a ValueError
        raise invalid from None
    if parts.scheme not in ("http", "https") or not host or len(host) > 253 or parts.port == 0:
        raise invalid


def post_callback(
    url: str, secret: str, event: str, delivery_id: str, payload: dict[str, Any], timeout_s: float
) -> int:
    """POST the signed payload; returns the HTTP status, raises XrayqError unless it is 2xx."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature(secret, int(time.time()), body),
        DELIVERY_HEADER: delivery_id,
        EVENT_HEADER: event,
        "User-Agent": "xrayq-callback/1",
    }
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=timeout_s, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise XrayqError("delivery_failed", f"callback not delivered: {type(exc).__name__}") from None
    if not 200 <= response.status_code < 300:
        raise XrayqError("delivery_failed", f"callback answered HTTP {response.status_code}")
    return response.status_code
