"""The dashboard's sessions: an API key, sent once, exchanged for a short-lived HttpOnly cookie.

`POST /v1/session` takes the key the usual way (`Authorization: Bearer`), so it is checked, cached and
throttled like every other request before anything is read; the cookie it sets is what the pages'
requests carry from then on (see services/gateway/access.py, shared/sessions.py).
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request, Response
from starlette.datastructures import Headers

from services.gateway.access import SESSION_COOKIE, SESSION_PREFIX, GuardedRoute, session_cookie
from services.gateway.deps import PrincipalCacheDep, PrincipalDep, SessionDep, SettingsDep
from services.gateway.problems import PROBLEMS
from shared.auth import Principal
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.schemas import SessionView
from shared.sessions import close_session, csrf_token, open_session, session_principal

router = APIRouter(prefix="/v1/session", tags=["dashboard"], route_class=GuardedRoute)


@router.post("", response_model=SessionView, responses=PROBLEMS)
def sign_in(
    request: Request, response: Response, principal: PrincipalDep, settings: SettingsDep, session: SessionDep
) -> SessionView:
    """Open a session for the key in `Authorization`: sets the `xrayq_session` cookie (HttpOnly,
    SameSite=Strict, Secure over https) and returns the CSRF token the page sends with state changes."""
    if not settings.auth_enabled:
        return session_view(principal, settings)
    key = request.headers.get("authorization", "").partition(" ")[2].strip()
    if not key:  # admitted by a cookie: a session never opens another (it would outlive its expiry)
        raise XrayqError("unauthorized", "Send the API key itself: `Authorization: Bearer <key>`.")
    token, expires_at = open_session(session, settings, principal, key)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.session_ttl_s),
        path="/",
        httponly=True,
        samesite="strict",
        secure=_over_tls(request, settings),
    )
    return session_view(principal, settings, expires_at, csrf_token(token))


@router.get("", response_model=SessionView, responses=PROBLEMS)
def who_am_i(request: Request, principal: PrincipalDep, settings: SettingsDep, session: SessionDep) -> SessionView:
    """Who the key or the session cookie acts for (and, for a cookie, its expiry and CSRF token)."""
    cookie = session_cookie(Headers(scope=request.scope))
    if settings.auth_enabled and cookie is not None and "authorization" not in request.headers:
        _, expires_at = session_principal(session, settings, cookie)
        return session_view(principal, settings, expires_at, csrf_token(cookie))
    return session_view(principal, settings)


@router.delete("", status_code=204, responses=PROBLEMS)
def sign_out(
    request: Request, _: PrincipalDep, session: SessionDep, principals: PrincipalCacheDep, settings: SettingsDep
) -> Response:
    """End the session whose cookie this request carries (with its CSRF token), and clear the cookie."""
    response = Response(status_code=204)
    cookie = session_cookie(Headers(scope=request.scope))
    if cookie is not None:
        close_session(session, cookie)
        principals.forget(SESSION_PREFIX + cookie)
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=_over_tls(request, settings)
    )
    return response


def session_view(
    principal: Principal, settings: Settings, expires_at: datetime | None = None, csrf: str | None = None
) -> SessionView:
    return SessionView(
        open_mode=not settings.auth_enabled,
        organisation=principal.organisation,
        roles=sorted(principal.roles),
        expires_at=expires_at,
        csrf_token=csrf,
    )


def _over_tls(request: Request, settings: Settings) -> bool:
    """https to us, or to the proxy in front of us (its public URL says so)."""
    return request.url.scheme == "https" or settings.public_url.startswith("https://")
