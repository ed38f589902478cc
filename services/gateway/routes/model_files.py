"""A model version's files, out: its weights (safetensors) and its card (JSON), for use elsewhere.

Read like the model itself (shared models and one's own organisation's; another's is a 404), and
every download is recorded (`shared/models/downloads.py`), listed at `/v1/models/{name}/downloads`.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Response

from services.gateway.access import GuardedRoute
from services.gateway.deps import PrincipalDep, SessionDep, StoreDep
from services.gateway.problems import PROBLEMS
from shared.core.errors import XrayqError
from shared.core.storage import ObjectNotFound
from shared.models.downloads import download_history, record_download
from shared.models.ownership import check_may_use, may_manage
from shared.models.registry import find_version
from shared.models.views import public_card
from shared.schemas import ModelDownloadView

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=GuardedRoute)
SHA256_HEADER = "X-Xrayq-SHA256"


@router.get(
    "/{name}/versions/{version}/weights",
    response_class=Response,
    responses={**PROBLEMS, 200: {"content": {"application/octet-stream": {}}, "description": "safetensors"}},
)
def download_weights(
    name: str, version: int, session: SessionDep, store: StoreDep, principal: PrincipalDep
) -> Response:
    """The version's weights as safetensors; `X-Xrayq-SHA256` is their sha256 (the version's `weights_sha256`)."""
    check_may_use(session, name, principal.scope)
    row = find_version(session, name, version)
    try:
        weights = store.get(row.weights_key)
    except ObjectNotFound:
        raise XrayqError("not_found", f"{name}@{version}'s weights are missing from storage.") from None
    record_download(session, row, "weights", api_key_id=principal.key_id, organisation=principal.organisation)
    return Response(
        weights,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{name}-v{version}.safetensors"',
            SHA256_HEADER: row.weights_sha256,
            "Cache-Control": "private, no-store",
        },
    )


@router.get(
    "/{name}/versions/{version}/card",
    response_class=Response,
    responses={**PROBLEMS, 200: {"content": {"application/json": {}}, "description": "The model card."}},
)
def download_card(name: str, version: int, session: SessionDep, principal: PrincipalDep) -> Response:
    """The version's model card (architecture, classes, preprocessing, metrics, intended use...); its
    provenance (datasets, runs, hosts) for the model's owner and admins only, as everywhere."""
    model = check_may_use(session, name, principal.scope)
    row = find_version(session, name, version)
    owner = model.owner if model is not None else None
    card = row.card if may_manage(owner, principal.scope) else public_card(row.card)
    record_download(session, row, "card", api_key_id=principal.key_id, organisation=principal.organisation)
    return Response(
        json.dumps(card, indent=2, default=str),
        media_type="application/json",
        headers={
            "Content-Disposition": f'attachment; filename="{name}-v{version}.card.json"',
            "Cache-Control": "private, no-store",
        },
    )


@router.get("/{name}/downloads", response_model=list[ModelDownloadView], responses=PROBLEMS)
def read_downloads(name: str, session: SessionDep, principal: PrincipalDep) -> list[ModelDownloadView]:
    """Who downloaded which version's weights or card, newest first: every download for the model's
    owner and admins, one's own organisation's otherwise."""
    model = check_may_use(session, name, principal.scope)
    if model is None:
        raise XrayqError("model_not_found", f"No model named {name!r}.")
    everyone = may_manage(model.owner, principal.scope)
    return download_history(session, name, everyone=everyone, organisation=principal.organisation)
