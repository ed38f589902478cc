"""HMAC-signed callbacks: a batch's result POSTed to the URL its client registered.

The signature header is `X-Xrayq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
(the scheme Stripe and others use): the receiver recomputes it over the raw body with its secret,
compares in constant time, and refuses stale timestamps, so a captured callback cannot be replayed
later. `X-Xrayq-Delivery` is the same on every retry of one delivery: receivers deduplicate on it.

The secret is the batch's own `callback_secret`, or else its organisation's: HMAC of the organisation's
name under the server's `XRAYQ_CALLBACK_SECRET` (`organisation_secret`), so no tenant holds a secret
that verifies another tenant's callbacks. The signed body names the organisation. Where a callback may
go, and how the connection is pinned and bounded in time, is `shared.jobs.egress`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.jobs.egress import Destination, DestinationRefused, PinnedBackend, check_destination

SIGNATURE_HEADER = "X-Xrayq-Signature"
DELIVERY_HEADER = "X-Xrayq-Delivery"
EVENT_HEADER = "X-Xrayq-Event"
MIN_SECRET_LENGTH = 16
# A receiver's answer matters only by its status; reading more of it would let an endless body hold us.
MAX_RESPONSE_BYTES = 4096
REFUSED = (
    "`callback_url` is not an allowed callback destination: an https URL whose host your organisation "
    "may use and that resolves to a public address (or to a network the administrator allows)."
)
log = logging.getLogger(__name__)


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


def organisation_secret(settings: Settings, organisation: str | None) -> str | None:
    """The organisation's signing secret, derived from the server secret (None: no server secret)."""
    if not settings.callback_secret:
        return None
    message = f"xrayq-callback-secret:{organisation or ''}".encode()
    return hmac.new(settings.callback_secret.encode(), message, hashlib.sha256).hexdigest()


def check_callback(
    url: str | None, secret: str | None, settings: Settings, organisation: str | None
) -> tuple[str | None, str | None]:
    """A registrable (url, secret): a destination the policy allows (see `shared.jobs.egress`), signed
    with the request's own secret (returned) or its organisation's (None is returned: derived when
    sent). No URL: (None, None). Every refusal of the destination reads the same to the client."""
    if not url:
        if secret:
            raise XrayqError("invalid_callback", "`callback_secret` without a `callback_url`.")
        return None, None
    check_callback_url(url)
    if secret is None and organisation_secret(settings, organisation) is None:
        raise XrayqError(
            "invalid_callback",
            f"A callback needs a `callback_secret` of at least {MIN_SECRET_LENGTH} characters to sign it with.",
        )
    if secret is not None and len(secret) < MIN_SECRET_LENGTH:
        raise XrayqError("invalid_callback", f"`callback_secret` must have at least {MIN_SECRET_LENGTH} characters.")
    try:
        check_destination(url, organisation, settings, settings.callback_timeout_s)
    except DestinationRefused as refused:
        log.warning("callback destination refused for organisation %r: %s", organisation, refused)
        raise XrayqError("callback_destination_refused", REFUSED) from None
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
    url: str,
    secret: str,
    event: str,
    delivery_id: str,
    payload: dict[str, Any],
    settings: Settings,
    organisation: str | None,
) -> int:
    """POST the signed payload to `url`, checked again now and connected to only at the checked address,
    all within `delivery_deadline_s`. Returns the HTTP status; raises XrayqError unless it is 2xx, with
    a message that names no address, port or network condition of ours."""
    deadline = time.monotonic() + settings.delivery_deadline_s
    try:
        destination = check_destination(url, organisation, settings, settings.callback_timeout_s)
    except DestinationRefused as refused:
        log.warning("callback of %s not sent: %s", delivery_id, refused)
        raise XrayqError("delivery_failed", "callback not sent: the destination is not allowed") from None
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Host": destination.url.netloc.decode("ascii"),
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        SIGNATURE_HEADER: signature(secret, int(time.time()), body),
        DELIVERY_HEADER: delivery_id,
        EVENT_HEADER: event,
        "User-Agent": "xrayq-callback/1",
    }
    try:
        return _post(destination, headers, body, deadline, settings.callback_timeout_s)
    except httpcore.TimeoutException:
        raise XrayqError("delivery_failed", "callback not delivered: no answer within the deadline") from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, ssl.SSLError) as exc:
        log.warning("callback of %s to %s failed: %s: %s", delivery_id, destination.key, type(exc).__name__, exc)
        raise XrayqError("delivery_failed", "callback not delivered: the receiver could not be reached") from None


def _post(destination: Destination, headers: dict[str, str], body: bytes, deadline: float, step_s: float) -> int:
    backend = PinnedBackend(destination, deadline)
    url = destination.url
    target = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)
    timeouts = {"connect": step_s, "read": step_s, "write": step_s, "pool": step_s}
    pool = httpcore.ConnectionPool(ssl_context=ssl.create_default_context(), network_backend=backend)
    with (
        pool,
        pool.stream(
            "POST", target, headers=list(headers.items()), content=body, extensions={"timeout": timeouts}
        ) as answer,
    ):
        received = 0
        for chunk in answer.iter_stream():  # at most a few KiB of it; closing drops the rest
            received += len(chunk)
            if received >= MAX_RESPONSE_BYTES:
                break
        status = int(answer.status)
    if not 200 <= status < 300:
        raise XrayqError("delivery_failed", f"callback answered HTTP {status}")
    return status
