"""Typed dependencies: every route states what it needs in its signature.

Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in its thread
pool, and on the submit path those hops cost more than the work itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from celery import Celery
from fastapi import Depends, Form, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session

from services.gateway.access import PrincipalCache, RoleRequirement
from services.gateway.admission import AdmissionQueue
from services.gateway.waiter import CompletionWaiter
from shared.audit import Actor
from shared.auth import Principal
from shared.core.settings import Settings
from shared.core.storage import ObjectStore
from shared.db.session import Database
from shared.jobs.listing import ListFilter


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> AsyncIterator[Session]:
    """A unit of work per request: committed when the route returns, rolled back if it raised.

    The one place a request commits. `SessionDep` gives it function scope, so the commit happens
    before the response is sent: a commit that fails is the client's error response, never a 2xx for
    a change that was not kept."""
    database: Database = request.app.state.database
    session = database.sessions()  # no connection yet: the route's first query opens one
    try:
        yield session
    except BaseException:
        await run_in_threadpool(database.finish, session, commit=False)
        raise
    await run_in_threadpool(database.finish, session, commit=True)


async def get_database(request: Request) -> Database:
    return request.app.state.database


async def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_admission(request: Request) -> AdmissionQueue:
    return request.app.state.admission


async def get_waiter(request: Request) -> CompletionWaiter:
    return request.app.state.waiter


async def get_principal_cache(request: Request) -> PrincipalCache:
    return request.app.state.principals


async def get_metrics(request: Request) -> CollectorRegistry:
    """The registry a scrape reads (every gateway process's samples; see metrics.scrape_registry)."""
    return request.app.state.metrics


def client_address(request: Request) -> str | None:
    """The address the request came from, as the audit trail records it."""
    return request.client.host if request.client else None


async def get_admin_actor(
    request: Request, principal: Annotated[Principal, Depends(RoleRequirement("admin"))]
) -> Actor:
    """An admin request's actor for the audit trail: its key, organisation and address."""
    return Actor(principal.key_id, principal.organisation, client_address(request))


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
# Who calls, and the role each route needs: read by `AccessControl` before the body (see access.py).
PrincipalDep = Annotated[Principal, Depends(RoleRequirement(None))]
SubmitterDep = Annotated[Principal, Depends(RoleRequirement("submit"))]
TrainerDep = Annotated[Principal, Depends(RoleRequirement("train"))]
AdminDep = Annotated[Principal, Depends(RoleRequirement("admin"))]
AdminActorDep = Annotated[Actor, Depends(get_admin_actor)]
SessionDep = Annotated[Session, Depends(get_db, scope="function")]
DatabaseDep = Annotated[Database, Depends(get_database)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
MetricsDep = Annotated[CollectorRegistry, Depends(get_metrics)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
PrincipalCacheDep = Annotated[PrincipalCache, Depends(get_principal_cache)]
AdmissionDep = Annotated[AdmissionQueue, Depends(get_admission)]
WaiterDep = Annotated[CompletionWaiter, Depends(get_waiter)]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Retry-safe submission: the same key and request return the original ids, never new jobs; "
        "the same key with a different request is a 409.",
    ),
]
# Text a client names things with: no control characters (Postgres refuses NUL in any text; the others
# have no place in a name, and would reach logs and other clients).
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
ClientRefForm = Annotated[
    str | None, Form(max_length=256, pattern=PRINTABLE, description="Your own reference, returned with the job.")
]
CallbackUrlForm = Annotated[
    str | None,
    Form(
        max_length=2048,
        pattern=PRINTABLE,
        description="POSTed the batch result, HMAC-signed (`X-Xrayq-Signature`), once every job has finished: "
        "https, to a public address (or a network the administrator allows), a host the organisation may use.",
    ),
]
CallbackSecretForm = Annotated[
    str | None,
    Form(
        min_length=16,
        max_length=256,
        pattern=PRINTABLE,
        description="Secret the callback is signed with (default: the organisation's, `GET /v1/callbacks/secret`).",
    ),
]
ModelForm = Annotated[
    str | None,
    Form(
        description="Model name, or name@version to pin one (default: XRAYQ_DEFAULT_MODEL).",
        max_length=160,
        pattern=PRINTABLE,
    ),
]
ExplainForm = Annotated[
    bool,
    Form(
        description="Also explain each answer: a Grad-CAM heatmap, made by the worker right after it, at "
        "`GET /v1/jobs/{id}/explanation`. Costs nothing when false.",
    ),
]


async def get_list_filter(
    model: Annotated[
        str | None, Query(max_length=128, pattern=PRINTABLE, description="Only this model name's.")
    ] = None,
    client_ref: Annotated[
        str | None, Query(max_length=256, pattern=PRINTABLE, description="Only those with this client reference.")
    ] = None,
    created_after: Annotated[datetime | None, Query(description="Submitted at or after (ISO 8601).")] = None,
    created_before: Annotated[datetime | None, Query(description="Submitted before (ISO 8601).")] = None,
) -> ListFilter:
    return ListFilter(model=model, client_ref=client_ref, created_after=created_after, created_before=created_before)


ListFilterDep = Annotated[ListFilter, Depends(get_list_filter)]
