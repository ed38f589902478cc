"""API key management (role `admin`): create (the key is shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway.access import GuardedRoute
from services.gateway.deps import AdminActorDep, AdminDep, PrincipalCacheDep, SessionDep
from services.gateway.problems import PROBLEMS
from shared.audit import record
from shared.auth import create_key, key_view, list_keys, revoke_key
from shared.db.session import after_commit
from shared.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyView

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"], route_class=GuardedRoute)


@router.post("", status_code=201, response_model=ApiKeyCreated, responses=PROBLEMS)
def create(body: ApiKeyCreate, session: SessionDep, actor: AdminActorDep) -> ApiKeyCreated:
    row, token = create_key(session, body.name, body.organisation, list(body.roles))
    record(
        session,
        "key.created",
        actor,
        entity_type="api_key",
        entity_id=row.id,
        detail={"organisation": row.organisation, "roles": sorted(row.roles)},
    )
    return ApiKeyCreated(**key_view(row).model_dump(), key=token)


@router.get("", response_model=list[ApiKeyView], responses=PROBLEMS)
def list_all(session: SessionDep, _: AdminDep) -> list[ApiKeyView]:
    return [key_view(row) for row in list_keys(session)]


@router.delete("/{key_id}", response_model=ApiKeyView, responses=PROBLEMS)
def revoke(key_id: str, session: SessionDep, principals: PrincipalCacheDep, actor: AdminActorDep) -> ApiKeyView:
    row = revoke_key(session, key_id)
    record(session, "key.revoked", actor, entity_type="api_key", entity_id=row.id)
    after_commit(session, principals.forget_all)  # this process stops honouring it at once
    return key_view(row)
