"""The model registry: names, versions, their cards, reports and plots; promotion and rollback.

Another organisation's model does not exist for a key (404); a shared one is read by everyone and
changed by admins only; provenance is shown to the owner and admins (`shared/models/ownership.py`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Response, UploadFile
from sqlalchemy.orm import Session

from services.gateway.access import GuardedRoute
from services.gateway.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep, TrainerDep
from services.gateway.problems import PROBLEMS
from shared.auth import Principal
from shared.core.errors import XrayqError
from shared.core.storage import ObjectNotFound
from shared.intake import refusals
from shared.intake.uploads import clean_filename, read_bounded
from shared.models.ownership import Actor, check_may_manage, check_may_use, may_manage
from shared.models.registry import activation_history, find_version, promote, promote_by_id, rollback
from shared.models.views import activation_view, model_views, version_view
from shared.schemas import (
    EvaluationSetRequest,
    EvaluationSetView,
    ModelActivationView,
    ModelVersionView,
    ModelView,
    PromoteRequest,
)
from shared.training.datasets import find_dataset
from shared.training.held_out import set_from_dataset
from shared.training.runs import DEFAULT_IMAGE_SIZE

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=GuardedRoute)


def actor_of(principal: Principal) -> Actor:
    return Actor(scope=principal.scope, organisation=principal.organisation, key_id=principal.key_id)


def sees_provenance(session: Session, name: str, principal: Principal) -> bool:
    """Whether `principal` may use `name` at all (404 if not) and read its provenance."""
    model = check_may_use(session, name, principal.scope)
    return may_manage(model.owner if model is not None else None, principal.scope)


@router.get("", response_model=list[ModelView], responses=PROBLEMS)
def list_models(session: SessionDep, principal: PrincipalDep) -> list[ModelView]:
    """The models this key may use: shared ones and its organisation's (an admin: all)."""
    return model_views(session, principal.scope)


@router.get("/{name}/versions/{version}", response_model=ModelVersionView, responses=PROBLEMS)
def read_model_version(name: str, version: int, session: SessionDep, principal: PrincipalDep) -> ModelVersionView:
    provenance = sees_provenance(session, name, principal)
    return version_view(find_version(session, name, version), provenance=provenance)


@router.get(
    "/{name}/versions/{version}/files/{file_name}",
    responses={**PROBLEMS, 200: {"content": {"image/png": {}}}},
    response_class=Response,
)
def read_model_file(
    name: str, version: int, file_name: str, session: SessionDep, store: StoreDep, principal: PrincipalDep
) -> Response:
    """A file stored with the version: its plots (confusion_matrix, roc_curve, learning_curves, robustness .png)."""
    check_may_use(session, name, principal.scope)
    row = find_version(session, name, version)
    key = row.card.get("files", {}).get(file_name)
    if key is None:
        raise XrayqError("not_found", f"{name}@{version} has no file {file_name!r}.")
    try:
        content = store.get(key)
    except ObjectNotFound:
        raise XrayqError("not_found", f"{name}@{version}'s {file_name!r} is missing from storage.") from None
    return Response(content, media_type="image/png", headers={"Cache-Control": "private, max-age=86400, immutable"})


@router.post("/{name}/versions/{version}/promote", response_model=ModelVersionView, responses=PROBLEMS)
def promote_version(name: str, version: int, session: SessionDep, principal: TrainerDep) -> ModelVersionView:
    """Make this version the one that answers `name`; workers switch within seconds, without a restart.

    Promoting an older version is a rollback to it. Jobs already answered keep their version. The
    model's owner or an admin only (403 `model_not_owned`); a shared model: an admin only.
    """
    return version_view(promote(session, name, version, actor_of(principal)))


@router.post("/{name}/promote", response_model=ModelVersionView, responses=PROBLEMS)
def promote_named(name: str, request: PromoteRequest, session: SessionDep, principal: TrainerDep) -> ModelVersionView:
    """The same, with the version in the body (`version`, or `model_version_id` of this model)."""
    if request.model_version_id:
        return version_view(promote_by_id(session, name, request.model_version_id, actor_of(principal)))
    if request.version is None:
        raise XrayqError("invalid_parameter", "Give `version` or `model_version_id`.")
    return version_view(promote(session, name, request.version, actor_of(principal)))


@router.post("/{name}/rollback", response_model=ModelVersionView, responses=PROBLEMS)
def rollback_model(name: str, session: SessionDep, principal: TrainerDep) -> ModelVersionView:
    """Undo the last promotion of `name`: the version active before it answers again (owner or admin)."""
    return version_view(rollback(session, name, actor_of(principal)))


@router.put("/{name}/evaluation-set", response_model=EvaluationSetView, responses=PROBLEMS)
def set_evaluation_set(
    name: str, request: EvaluationSetRequest, session: SessionDep, store: StoreDep, principal: TrainerDep
) -> EvaluationSetView:
    """Judge `if_better` runs of `name` on a split of one of your datasets from now on (owner or admin)."""
    model = check_may_manage(session, name, principal.scope, lock=True)
    if model is None:
        raise XrayqError("model_not_found", f"No model named {name!r}.")
    dataset = find_dataset(session, request.dataset, principal.scope)
    return EvaluationSetView(**set_from_dataset(session, store, model, dataset, request.split))


@router.get("/{name}/activations", response_model=list[ModelActivationView], responses=PROBLEMS)
def read_activations(name: str, session: SessionDep, principal: PrincipalDep) -> list[ModelActivationView]:
    """Which version was made active when, by whom (key and organisation: owner and admins) and why."""
    provenance = sees_provenance(session, name, principal)
    return [activation_view(row, provenance=provenance) for row in activation_history(session, name)]


@router.post("/{name}/import", status_code=201, response_model=ModelVersionView, responses=PROBLEMS)
def import_weights(
    name: str,
    principal: TrainerDep,
    response: Response,
    settings: SettingsDep,
    session: SessionDep,
    store: StoreDep,
    file: Annotated[UploadFile, File(description="The state dict as safetensors (a pickle or .pt is refused).")],
    architecture: Annotated[str, Form(description="The torchvision classification model it is for, e.g. resnet18.")],
    sha256: Annotated[str, Form(description="The file's SHA-256 (64 hex digits), checked against what arrives.")],
    classes: Annotated[
        str | None, Form(description="Required: its outputs' class names in order, comma-separated (2 to 1000).")
    ] = None,
    image_size: Annotated[
        int | None, Form(ge=16, le=1024, description=f"Input size in px; default {DEFAULT_IMAGE_SIZE}, the recipe's.")
    ] = None,
    color: Annotated[Literal["grayscale", "rgb"], Form(description="Input colour; default grayscale.")] = "grayscale",
) -> ModelVersionView:
    """Register weights made elsewhere as a new, inactive version of `name` (owner or admin; a new name
    becomes the key's organisation's). Promote it to serve it, or fine-tune from it (`base_model`)."""
    from shared.models.imports import import_version  # loads torch: the gateway pays for it on imports only

    filename = clean_filename(file.filename, "weights.safetensors")
    limit = settings.max_weights_upload_bytes
    if file.size is not None and file.size > limit:
        raise refusals.file_too_large(filename, limit)
    row = import_version(
        session,
        store,
        lambda: read_bounded(file.file, limit, filename),
        name=name,
        importer=actor_of(principal),
        architecture=architecture.strip(),
        classes=[label.strip() for label in classes.split(",")] if classes else [],
        image_size=image_size or DEFAULT_IMAGE_SIZE,
        color=color,
        sha256=sha256,
        filename=filename,
    )
    response.headers["Location"] = f"/v1/models/{row.name}/versions/{row.version}"
    return version_view(row)
