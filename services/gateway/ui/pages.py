"""The dashboard's pages and their static files, served by the gateway at `/`.

A page is a template with no data in it: its script (static/, one per page) reads everything from
the JSON API, as any client would, so a page can show and do no more than its key may. The page
itself only says who is signed in (to hide what the key may not do) and carries the session's CSRF
token. Outside the open embedded mode a page without a session is the sign-in form, which exchanges
an API key for the session cookie (`POST /v1/session`).

Every script and style ships in static/ (no CDN: hospital networks are often closed), and the
Content-Security-Policy lets pages run only those: no inline script, no other origin.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from pathlib import Path

import jinja2
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.datastructures import Headers

from services.gateway.access import CSRF_HEADER, GuardedRoute, session_cookie
from services.gateway.problems import error_response
from shared.auth import Principal
from shared.core.errors import XrayqError
from shared.sessions import csrf_token

HERE = Path(__file__).parent
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
)
# Read once: only these files are served, so no request path ever reaches the file system.
STATIC = {path.name: path.read_bytes() for path in sorted((HERE / "static").iterdir()) if path.is_file()}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Page:
    path: str
    title: str
    role: str | None  # the role its actions need (None: any key)
    summary: str


PAGES = (
    Page("/classify", "Classify", "submit", "Drop images, DICOM files or a ZIP; results appear as jobs finish."),
    Page("/batches", "Batches & jobs", "submit", "Live progress of batches and studies; filter, inspect, cancel."),
    Page("/models", "Models", None, "Every version side by side: metrics, plots, promotion, history, files."),
    Page("/training", "Training", "train", "Datasets, training runs with live curves, cancellation."),
    Page("/operations", "Operations", "admin", "Throughput, latency, queues, workers, error rate, active versions."),
)

router = APIRouter(tags=["dashboard"], route_class=GuardedRoute, include_in_schema=False)


@router.get("/")
async def home(request: Request) -> Response:
    """The first page the signed-in key may use (the sign-in form when there is no session)."""
    principal = await _principal(request)
    if principal is None:
        return _render(request, "sign_in.html", None, None)
    first = next((page for page in PAGES if page.role is None or principal.has(page.role)), PAGES[2])
    return RedirectResponse(first.path, status_code=303)


def _page_route(page: Page) -> None:
    async def show(request: Request) -> Response:
        principal = await _principal(request)
        if principal is None:
            return _render(request, "sign_in.html", None, None)
        return _render(request, f"{page.path.strip('/')}.html", principal, page)

    show.__name__ = f"page_{page.path.strip('/')}"
    router.add_api_route(page.path, show, methods=["GET"], response_class=HTMLResponse)


for _page in PAGES:
    _page_route(_page)


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    content = STATIC.get(name)
    if content is None:
        return error_response(XrayqError("not_found", f"No static file {name!r}."), f"/static/{name}")
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    return Response(content, media_type=media_type, headers=headers)


async def _principal(request: Request) -> Principal | None:
    return await request.app.state.gatekeeper.session_of(request.scope)


def _render(request: Request, template: str, principal: Principal | None, page: Page | None) -> HTMLResponse:
    settings = request.app.state.settings
    cookie = session_cookie(Headers(scope=request.scope))
    context = {
        "page": page,
        "pages": [p for p in PAGES if principal is not None and (p.role is None or principal.has(p.role))],
        "principal": principal,
        "roles": sorted(principal.roles) if principal else [],
        "may": {role: principal is not None and principal.has(role) for role in ("submit", "train", "admin")},
        "open_mode": not settings.auth_enabled,
        "csrf_token": csrf_token(cookie) if cookie and settings.auth_enabled else "",
        "csrf_header": CSRF_HEADER,
    }
    html = TEMPLATES.get_template(template).render(**context)
    return HTMLResponse(html, headers=PAGE_HEADERS)
