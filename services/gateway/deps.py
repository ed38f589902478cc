"""Typed dependencies: every route states what it needs in its signature."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Form, Header, Request
from sqlalchemy.orm import Session

from shared.auth import OPEN, Principal, authenticate, require
from shared.db.session import Database
from shared.settings import Settings
from shared.storage import ObjectStore


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    database: Database = request.app.state.database
    with database.session() as session:
        yield session


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_principal(
    request: Request,
    authorization: Annotated[str | None, Header(description="`Bearer <API key>`")] = None,
) -> Principal:
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return OPEN
    token = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
    with request.app.state.database.session() as session:
        return authenticate(session, settings, token)


def requires(role: str):  # type: ignore[no-untyped-def]
    def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        require(principal, role)
        return principal

    return check


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
SubmitterDep = Annotated[Principal, Depends(requires("submit"))]
TrainerDep = Annotated[Principal, Depends(requires("train"))]
AdminDep = Annotated[Principal, Depends(requires("admin"))]
SessionDep = Annotated[Session, Depends(get_db)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Retry-safe submission: the same key and request return the original ids, never new jobs; "
        "the same key with a different request is a 409.",
    ),
]
CallbackUrlForm = Annotated[
    str | None,
    Form(
        max_length=2048,
        description="POSTed the batch result, HMAC-signed (`X-Xrayq-Signature`), once every job has finished.",
    ),
]
CallbackSecretForm = Annotated[
    str | None,
    Form(
        min_length=16,
        max_length=256,
        description="Secret the callback is signed with (default: the server's XRAYQ_CALLBACK_SECRET).",
    ),
]
ModelForm = Annotated[
    str | None,
    Form(description="Model name, or name@version to pin one (default: XRAYQ_DEFAULT_MODEL).", max_length=160),
]
