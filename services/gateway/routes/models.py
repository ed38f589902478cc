"""The model registry: names, versions, their cards, reports and plots; promotion and rollback."""

from __future__ import annotations

from fastapi import APIRouter, Response

from services.gateway.access import GuardedRoute
from services.gateway.deps import PrincipalDep, SessionDep, StoreDep, TrainerDep
from services.gateway.problems import PROBLEMS
from shared.core.errors import XrayqError
from shared.core.storage import ObjectNotFound
from shared.models.registry import activation_history, find_version, promote, promote_by_id, rollback
from shared.models.views import activation_view, model_views, version_view
from shared.schemas import ModelActivationView, ModelVersionView, ModelView, PromoteRequest

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=GuardedRoute)


@router.get("", response_model=list[ModelView], responses=PROBLEMS)
def list_models(session: SessionDep, _: PrincipalDep) -> list[ModelView]:
    return model_views(session)


@router.get("/{name}/versions/{version}", response_model=ModelVersionView, responses=PROBLEMS)
def read_model_version(name: str, version: int, session: SessionDep, _: PrincipalDep) -> ModelVersionView:
    return version_view(find_version(session, name, version))


@router.get(
    "/{name}/versions/{version}/files/{file_name}",
    responses={**PROBLEMS, 200: {"content": {"image/png": {}}}},
    response_class=Response,
)
def read_model_file(
    name: str, version: int, file_name: str, session: SessionDep, store: StoreDep, _: PrincipalDep
) -> Response:
    """A file stored with the version: its plots (confusion_matrix.png, roc_curve.png, learning_curves.png)."""
    row = find_version(session, name, version)
    key = row.card.get("files", {}).get(file_name)
    if key is None:
        raise XrayqError("not_found", f"{name}@{version} has no file {file_name!r}.")
    try:
        content = store.get(key)
    except ObjectNotFound:
        raise XrayqError("not_found", f"{name}@{version}'s {file_name!r} is missing from storage.") from None
    return Response(content, media_type="image/png", headers={"Cache-Control": "public, max-age=86400, immutable"})


@router.post("/{name}/versions/{version}/promote", response_model=ModelVersionView, responses=PROBLEMS)
def promote_version(name: str, version: int, session: SessionDep, principal: TrainerDep) -> ModelVersionView:
    """Make this version the one that answers `name`; workers switch within seconds, without a restart.

    Promoting an older version is a rollback to it. Jobs already answered keep their version.
    """
    row = promote(session, name, version, actor=principal.organisation)
    return version_view(row)


@router.post("/{name}/promote", response_model=ModelVersionView, responses=PROBLEMS)
def promote_named(name: str, request: PromoteRequest, session: SessionDep, principal: TrainerDep) -> ModelVersionView:
    """The same, with the version in the body (`version`, or `model_version_id` of this model)."""
    if request.model_version_id:
        return version_view(promote_by_id(session, name, request.model_version_id, actor=principal.organisation))
    if request.version is None:
        raise XrayqError("invalid_parameter", "Give `version` or `model_version_id`.")
    return version_view(promote(session, name, request.version, actor=principal.organisation))


@router.post("/{name}/rollback", response_model=ModelVersionView, responses=PROBLEMS)
def rollback_model(name: str, session: SessionDep, principal: TrainerDep) -> ModelVersionView:
    """Undo the last promotion of `name`: the version active before it answers again."""
    return version_view(rollback(session, name, actor=principal.organisation))


@router.get("/{name}/activations", response_model=list[ModelActivationView], responses=PROBLEMS)
def read_activations(name: str, session: SessionDep, _: PrincipalDep) -> list[ModelActivationView]:
    """Which version was made active when, by whom and why (newest first)."""
    return [activation_view(row) for row in activation_history(session, name)]
