"""A job's explanation (a Grad-CAM heatmap of its answer): ask for it, read it as a PNG or as the raw map.

The gateway only records the request and publishes it (`shared.jobs.explanations`); a worker computes
it. The same organisation scoping as `GET /v1/jobs/{id}`: another organisation's job is not found.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from services.gateway.access import GuardedRoute
from services.gateway.deps import CeleryDep, SessionDep, SettingsDep, StoreDep, SubmitterDep
from services.gateway.problems import PROBLEMS
from shared.jobs.explanations import find_explanation, request_explanation
from shared.schemas import ExplanationState, ExplanationView

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=GuardedRoute)
PENDING_RETRY_AFTER_S = 1


@router.post(
    "/{job_id}/explanation",
    status_code=202,
    response_model=ExplanationState,
    responses={**PROBLEMS, 200: {"model": ExplanationState, "description": "It exists already: made, or failed."}},
)
def ask_for_explanation(
    job_id: str,
    response: Response,
    session: SessionDep,
    celery: CeleryDep,
    settings: SettingsDep,
    principal: SubmitterDep,
) -> ExplanationState:
    """Ask a worker to explain the job's answer (202, pending); an explanation that exists is answered
    as it is (200), never made twice. A failed or cancelled job: 409 `job_not_succeeded`."""
    requested = request_explanation(
        session, celery, job_id, principal.scope, republish_after_s=settings.requeue_after_s
    )
    response.headers["Location"] = requested.state.location
    if requested.state.status != "pending":
        response.status_code = 200
    return requested.state


@router.get(
    "/{job_id}/explanation",
    response_model=ExplanationView,
    responses={
        **PROBLEMS,
        200: {
            "content": {"image/png": {}},
            "description": "The overlay PNG; or, with `format=json` (or `Accept: application/json`), the raw map.",
        },
        202: {"model": ExplanationState, "description": "Asked for, not made yet: ask again (`Retry-After`)."},
    },
)
def read_explanation(
    job_id: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: SubmitterDep,
    as_format: Annotated[
        Literal["png", "json"] | None,
        Query(alias="format", description="`png`: the overlay; `json`: the raw map. Default: by `Accept`, else png."),
    ] = None,
) -> Response:
    """The Grad-CAM heatmap of the job's answer, blended over the image at the model's input size (PNG),
    or the raw map (JSON). 404 `explanation_not_requested` when none was asked for, 409
    `job_not_succeeded` for a failed or cancelled job, the explanation's own code when it failed."""
    found = find_explanation(session, job_id, principal.scope)
    if isinstance(found, ExplanationState):
        headers = {"Retry-After": str(PENDING_RETRY_AFTER_S), "Location": found.location}
        return JSONResponse(found.model_dump(mode="json"), status_code=202, headers=headers)
    model = found.model
    headers = {"X-Xrayq-Model": f"{model.name}@{model.version}"}
    if as_format == "json" or (as_format is None and _prefers_json(request.headers.get("accept", ""))):
        view = found.view(json.loads(store.get(found.map_key)))
        return JSONResponse(view.model_dump(mode="json"), headers=headers)
    return Response(store.get(found.overlay_key), media_type="image/png", headers=headers)


def _prefers_json(accept: str) -> bool:
    """JSON for clients that ask for it and not for an image (a browser's <img> asks for image/*)."""
    accept = accept.lower()
    return "application/json" in accept and "image/" not in accept
