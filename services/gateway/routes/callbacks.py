"""What an organisation's callback receiver needs from us: the secret its callbacks are signed with."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from services.gateway.access import GuardedRoute
from services.gateway.deps import SettingsDep, SubmitterDep
from services.gateway.problems import PROBLEMS
from shared.core.errors import XrayqError
from shared.jobs.callbacks import organisation_secret
from shared.schemas import CallbackSecretView

router = APIRouter(prefix="/v1/callbacks", tags=["callbacks"], route_class=GuardedRoute)


@router.get("/secret", response_model=CallbackSecretView, responses=PROBLEMS)
def secret(
    principal: SubmitterDep,
    settings: SettingsDep,
    organisation: Annotated[
        str | None, Query(max_length=128, description="Admins only: the organisation to show the secret of.")
    ] = None,
) -> CallbackSecretView:
    """The caller's organisation's signing secret (an admin may name any organisation)."""
    if organisation is not None and principal.scope is not None and organisation != principal.organisation:
        raise XrayqError("forbidden", "Only an admin may read another organisation's callback secret.")
    named = organisation if organisation is not None else principal.organisation
    derived = organisation_secret(settings, named)
    if derived is None:
        raise XrayqError(
            "callback_secret_not_configured",
            "The server has no XRAYQ_CALLBACK_SECRET: send a `callback_secret` with each callback_url.",
        )
    return CallbackSecretView(organisation=named, secret=derived)
