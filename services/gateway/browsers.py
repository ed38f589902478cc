"""What a web page in someone's browser may not make the gateway do.

The open embedded mode (loopback, no API keys) trusts whoever reaches it, and a browser reaches it on
behalf of any page: by DNS rebinding (a page on the attacker's name, re-pointed to 127.0.0.1, sends
requests whose `Host` is that name) or by plain cross-site requests, which need no CORS preflight when
they are "simple" (a form post, a bodiless POST such as a promotion). So:

- in open mode the `Host` must be one of ours (`XRAYQ_HOST`, the `XRAYQ_PUBLIC_URL`'s host, loopback
  names, `XRAYQ_ALLOWED_HOSTS`);
- a state change (any method but GET, HEAD, OPTIONS) that a browser marks as coming from another site
  is refused: an `Origin` that is neither this gateway's own nor in `XRAYQ_CORS_ORIGINS`, or
  `Sec-Fetch-Site: cross-site` from a page not in `XRAYQ_CORS_ORIGINS`. Browsers send `Origin` with
  every POST, so a state change without one comes from a program (curl, the CLI), never from a page;
  a same-origin page (the /docs "Try it out" button) sends its own origin and is served. A cross-site
  page is therefore left only with non-simple requests, which its browser preflights and CORS refuses.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.problems import error_response
from shared.core.errors import XrayqError
from shared.core.settings import Settings

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})


class BrowserGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.check_host = not settings.auth_enabled
        extra_hosts = {host.strip().lower() for host in settings.allowed_hosts.split(",") if host.strip()}
        self.any_host = "*" in extra_hosts
        public_host = urlsplit(settings.public_url).hostname or ""
        self.hosts = (LOOPBACK_NAMES | extra_hosts | {settings.host.lower(), public_host}) - WILDCARD_BINDS
        origins = settings.cors_origins.split(",")
        self.cors_origins = {origin.strip().rstrip("/") for origin in origins if origin.strip()}
        self.public_origin = _origin_of(settings.public_url)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = None
        if self.check_host and not self._host_allowed(headers.get("host")):
            refusal = XrayqError("host_not_allowed", "This gateway does not answer for that host name.")
        elif scope["method"] not in SAFE_METHODS and self._cross_site(headers):
            refusal = XrayqError("cross_site_request", "State changes are not accepted from another site's page.")
        if refusal is None:
            await self.app(scope, receive, send)
            return
        response = error_response(refusal, scope.get("path"))
        response.headers["Connection"] = "close"
        await response(scope, receive, send)

    def _host_allowed(self, host: str | None) -> bool:
        if host is None or self.any_host:  # no Host: HTTP/1.0 from a program; browsers always send one
            return True
        try:
            name = urlsplit(f"//{host}").hostname
        except ValueError:
            return False
        return name is not None and name in self.hosts

    def _cross_site(self, headers: Headers) -> bool:
        origin = headers.get("origin")
        configured = origin is not None and origin.rstrip("/") in self.cors_origins
        if headers.get("sec-fetch-site") == "cross-site" and not configured:
            return True
        if origin is None or configured:
            return False
        host = headers.get("host", "")
        own = {self.public_origin, _origin_of(f"http://{host}"), _origin_of(f"https://{host}")}
        return _origin_of(origin) not in own


def _origin_of(url: str) -> str:
    """scheme://host[:port], lower case, without a default port."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return ""
    if not parts.scheme or not parts.hostname:
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")
