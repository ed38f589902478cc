"""Refuse URLs that carry control characters, before any route sees them.

A percent-encoded NUL in a path or query parameter (`/v1/jobs/%00`) reaches a database query as a
NUL character, which Postgres refuses with an error the route cannot tell from an outage; no id,
name or filter of this API holds a control character, so the request is refused as invalid.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.problems import problem_response

_CONTROL = frozenset(range(0x20)) | {0x7F}


class PrintableUrls:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _has_control_characters(scope):
            response = problem_response(422, "invalid_request", "The URL holds control characters.", None)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _has_control_characters(scope: Scope) -> bool:
    path = scope.get("path", "").encode("utf-8", "surrogateescape")
    query = unquote_to_bytes(scope.get("query_string", b"") or b"")
    return not _CONTROL.isdisjoint(path) or not _CONTROL.isdisjoint(query)
