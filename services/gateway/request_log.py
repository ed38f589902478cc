"""Every request gets an id and one access-log line.

The id is the client's `X-Request-ID` when it sends a plain one (a proxy or PACS integration that
already tags its calls), else a new one; it is bound to the log context for the whole request (so the
lines the request causes, and the Celery messages it publishes, carry it) and sent back in the
response's `X-Request-ID`. The access line (logger `xrayq.access`) names the route's template, never
the raw path or query string (ids in paths are kept by the template's shape; a query may hold a
secret), with the status, duration, and the key and organisation that made the request.
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.access import PRINCIPAL_SCOPE_KEY
from shared.auth import Principal
from shared.core import log_context

REQUEST_ID_HEADER = "X-Request-ID"
access_log = logging.getLogger("xrayq.access")


class RequestLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handle = self._logged if scope["type"] == "http" else self.app
        await handle(scope, receive, send)

    async def _logged(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = log_context.request_id_from(Headers(scope=scope).get(REQUEST_ID_HEADER))
        started = time.perf_counter()
        status = 500  # what the client sees when the app raised before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        with log_context.bound(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                principal: Principal | None = scope.get(PRINCIPAL_SCOPE_KEY)
                access_log.info(
                    "%s %s %d",
                    scope["method"],
                    _route_template(scope),
                    status,
                    extra={
                        "method": scope["method"],
                        "route": _route_template(scope),
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                        "key_id": principal.key_id if principal else None,
                        "organisation": principal.organisation if principal else None,
                    },
                )


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    # Static files and refusals before routing have no route: their path names no record of anyone.
    return getattr(route, "path", None) or "unmatched"
