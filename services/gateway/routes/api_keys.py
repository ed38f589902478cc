"""API key management (role `admin`): create (the key is shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Request

from services.gateway.deps import AdminDep, SessionDep
from services.gateway.problems import PROBLEMS
from shared.auth import create_key, list_keys, revoke_key
from shared.db.models import ApiKey, as_utc
from shared.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyView

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"])


def key_view(row: ApiKey) -> ApiKeyView:
    return ApiKeyView(
        id=row.id,
        name=row.name,
        organisation=row.organisation,
        roles=list(row.roles),
        key_prefix=row.key_prefix,
        created_at=as_utc(row.created_at),
        revoked_at=as_utc(row.revoked_at),
    )


@router.post("", status_code=201, response_model=ApiKeyCreated, responses=PROBLEMS)
def create(body: ApiKeyCreate, session: SessionDep, _: AdminDep) -> ApiKeyCreated:
    row, token = create_key(session, body.name, body.organisation, list(body.roles))
    session.commit()
    return ApiKeyCreated(**key_view(row).model_dump(), key=token)


@router.get("", response_model=list[ApiKeyView], responses=PROBLEMS)
def list_all(session: SessionDep, _: AdminDep) -> list[ApiKeyView]:
    return [key_view(row) for row in list_keys(session)]


@router.delete("/{key_id}", response_model=ApiKeyView, responses=PROBLEMS)
def revoke(key_id: str, request: Request, session: SessionDep, _: AdminDep) -> ApiKeyView:
    row = revoke_key(session, key_id)
    session.commit()
    request.app.state.principals.forget_all()  # this process stops honouring it at once
    return key_view(row)
