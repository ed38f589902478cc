"""Who may call which route, decided from the request's headers before a byte of its body is read.

FastAPI reads and parses a route's body (forms, files, JSON) before it runs the route's dependencies,
so a dependency alone would let anyone without a key make the gateway read a 4 GiB upload. Here the
statement of a route's role -- the `RoleRequirement` in its signature (`SubmitterDep`, ...) -- is read
off the route once, by its route class `GuardedRoute`, which admits the caller (401, 403 or 429 from
the headers alone) before the handler that reads the body runs, and closes the connection rather than
draining what the client still sends. The dependency then hands the route the principal admitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import Scope

from services.gateway.problems import error_response
from services.gateway.throttle import RequestLimits
from shared.audit import Actor, record
from shared.auth import OPEN, Principal, authenticate, hash_key, require
from shared.core import log_context
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.db.session import Database
from shared.sessions import csrf_matches, session_principal

PRINCIPAL_SCOPE_KEY = "xrayq.principal"
MISSING_KEY = "Send an API key: `Authorization: Bearer <key>`."
# The dashboard's session (shared/sessions.py): an HttpOnly cookie stands in for the key, and every
# state change made with it carries the session's CSRF token in this header.
SESSION_COOKIE = "xrayq_session"
CSRF_HEADER = "X-Xrayq-CSRF"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A route's requirement: the roles it needs (empty: any valid key), or None for an open route.
Requirement = frozenset[str] | None


class RoleRequirement:
    """A route's dependency on who calls it, and the one place its required role is stated.

    `role` None: any valid key. `AccessControl` has already authenticated and authorised the request;
    this hands the route its principal, and fails closed if the request somehow bypassed the check."""

    def __init__(self, role: str | None) -> None:
        self.role = role

    async def __call__(
        self,
        request: Request,
        authorization: Annotated[str | None, Header(description="`Bearer <API key>`")] = None,
    ) -> Principal:
        principal: Principal | None = request.scope.get(PRINCIPAL_SCOPE_KEY)
        if principal is None:
            raise XrayqError("unauthorized", MISSING_KEY)
        if self.role:
            require(principal, self.role)
        return principal


class PrincipalCache:
    """Recently seen API keys (by hash) and who they act for, so a request does not cost a query.

    Entries live `ttl_s` seconds: a key revoked through another gateway process stops working within
    that time; one revoked through this process stops at once (`forget_all`).
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, token: str) -> Principal | None:
        entry = self._entries.get(hash_key(token))
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, token: str, principal: Principal) -> None:
        if self.ttl_s > 0:
            if len(self._entries) >= 10_000:  # bounded; each key is looked up again on its next use
                self._entries.clear()
            self._entries[hash_key(token)] = (principal, time.monotonic() + self.ttl_s)

    def vouches_for(self, token: str) -> bool:
        """The key authenticated here before (expired or not): its owner is not held up by others' guesses
        from the same address (a NAT, a proxy). It is still looked up, never let through unchecked."""
        return hash_key(token) in self._entries

    def forget(self, token: str) -> None:
        self._entries.pop(hash_key(token), None)

    def forget_all(self) -> None:
        self._entries.clear()


def _requirement(dependant: Dependant) -> Requirement:
    found = [dependency.role for dependency in _role_requirements(dependant)]
    return frozenset(role for role in found if role) if found else None


def _role_requirements(dependant: Dependant) -> list[RoleRequirement]:
    found = []
    for dependency in dependant.dependencies:
        if isinstance(dependency.call, RoleRequirement):
            found.append(dependency.call)
        found.extend(_role_requirements(dependency))
    return found


class GuardedRoute(APIRoute):
    """A route that admits its caller before FastAPI reads its body (every router's `route_class`).

    The handler FastAPI builds parses the body first and runs the dependencies after; this one first
    asks the app's `Gatekeeper` about the role the route's `RoleRequirement` states, and only then
    hands the request to that handler."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        requirement = _requirement(self.dependant)
        if requirement is None:
            return handler

        async def admit_then_handle(request: Request) -> Response:
            gatekeeper: Gatekeeper = request.app.state.gatekeeper
            try:
                principal = request.scope[PRINCIPAL_SCOPE_KEY] = await gatekeeper.admit(request.scope, requirement)
            except XrayqError as refusal:
                response = error_response(refusal, request.url.path)
                if _body_pending(request.headers):  # what the client still sends is never read: close
                    response.headers["Connection"] = "close"
                return response
            # The lines this request logs from here on name its key; `RequestLog` resets the context.
            log_context.bind(key_id=principal.key_id, organisation=principal.organisation)
            return await handler(request)

        return admit_then_handle


class Gatekeeper:
    """Authenticates a request from its `Authorization` header, checks its roles and its limits."""

    def __init__(self, settings: Settings, principals: PrincipalCache, database: Database) -> None:
        self.settings = settings
        self.principals = principals
        self.database = database
        self.limits = RequestLimits(settings)

    async def admit(self, scope: Scope, roles: frozenset[str]) -> Principal:
        if not self.settings.auth_enabled:
            return OPEN
        principal = await self._authenticate(scope)
        for role in roles:
            require(principal, role)
        refusal = await self.limits.admit(principal.key_id or principal.organisation or "", scope["method"] == "POST")
        if refusal is not None:
            raise refusal
        return principal

    async def _authenticate(self, scope: Scope) -> Principal:
        headers = Headers(scope=scope)
        token = _bearer_token(headers.get("authorization"))
        if token is None:
            cookie = session_cookie(headers)
            if cookie is None:  # nothing to look up, so nothing to throttle
                raise XrayqError("unauthorized", MISSING_KEY)
            # A cookie goes with every request the browser makes to us, whichever page asked for it.
            if scope["method"] not in SAFE_METHODS and not csrf_matches(cookie, headers.get(CSRF_HEADER)):
                raise XrayqError("csrf_token_invalid", f"A change made with the session cookie needs {CSRF_HEADER}.")
            return await self._look_up(scope, SESSION_PREFIX + cookie, self._session_in_database)
        return await self._look_up(scope, token, self._authenticate_in_database)

    async def session_of(self, scope: Scope) -> Principal | None:
        """Who the session cookie of a page request acts for (None: no session, or one that ended)."""
        if not self.settings.auth_enabled:
            return OPEN
        cookie = session_cookie(Headers(scope=scope))
        if cookie is None:
            return None
        try:
            return await self._look_up(scope, SESSION_PREFIX + cookie, self._session_in_database)
        except XrayqError:
            return None

    async def _look_up(self, scope: Scope, token: str, look_up: Callable[[str], Principal]) -> Principal:
        principal = self.principals.get(token)
        if principal is not None:
            return principal
        # Guessing keys costs a lookup each: throttled per address, except for keys known here.
        address = scope["client"][0] if scope.get("client") else "unknown"
        if not self.principals.vouches_for(token):
            throttled = await self.limits.failed_authentication_wait(address)
            if throttled is not None:
                raise throttled
        try:
            principal = await run_in_threadpool(look_up, token)
        except XrayqError as refusal:
            await self.limits.record_failed_authentication(address)
            await run_in_threadpool(self._record_failure, address, refusal.code, token.startswith(SESSION_PREFIX))
            raise
        self.principals.put(token, principal)
        return principal

    def _record_failure(self, address: str, code: str, session_cookie: bool) -> None:
        """An unknown or revoked key (or session) is audited: where it came from, never the token itself."""
        with self.database.session() as session:
            detail = {"code": code, "credential": "session" if session_cookie else "api_key"}
            record(session, "auth.failed", Actor(address=address), outcome="failure", detail=detail)

    def _authenticate_in_database(self, token: str) -> Principal:
        with self.database.session() as session:
            return authenticate(session, self.settings, token)

    def _session_in_database(self, token: str) -> Principal:
        with self.database.session() as session:
            return session_principal(session, self.settings, token.removeprefix(SESSION_PREFIX))[0]


# Sessions share the cache of checked keys; the prefix keeps a session token from passing as a key.
SESSION_PREFIX = "session:"


def session_cookie(headers: Headers) -> str | None:
    cookies = headers.get("cookie")
    if not cookies or SESSION_COOKIE not in cookies:
        return None
    return cookie_parser(cookies).get(SESSION_COOKIE) or None


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def _body_pending(headers: Headers) -> bool:
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
