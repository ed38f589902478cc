"""Training runs: start one on a dataset, watch its progress, cancel it."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Response

from services.gateway.access import GuardedRoute
from services.gateway.deps import CeleryDep, SessionDep, SettingsDep, StoreDep, TrainerDep
from services.gateway.problems import PROBLEMS
from shared.db.models import RunStatus
from shared.db.session import after_commit
from shared.schemas import TrainingRunCreate, TrainingRunView
from shared.training.checkpoints import discard_checkpoint
from shared.training.runs import cancel_run, create_run, find_run, list_runs, publish_run, run_view

router = APIRouter(prefix="/v1/training-runs", tags=["training runs"], route_class=GuardedRoute)


@router.post("", status_code=202, response_model=TrainingRunView, responses=PROBLEMS)
def start_run(
    request: TrainingRunCreate,
    principal: TrainerDep,
    response: Response,
    settings: SettingsDep,
    session: SessionDep,
    celery: CeleryDep,
) -> TrainingRunView:
    """Queue a run on `train`; one trainer executes one run at a time, in order.

    It registers into the model `model_name`: a new name becomes the key's organisation's (an admin's:
    shared); an existing one must be the organisation's own (403 `model_not_owned`), a shared one an admin's.
    """
    run = create_run(
        session, settings, request, principal.organisation, model_scope=principal.scope, api_key_id=principal.key_id
    )
    # The row first, then the message (a run whose message is lost is published again by the reconciler).
    after_commit(session, partial(publish_run, celery, run.id))
    response.headers["Location"] = f"/v1/training-runs/{run.id}"
    return run_view(session, run)


@router.get("", response_model=list[TrainingRunView], responses=PROBLEMS)
def read_runs(principal: TrainerDep, session: SessionDep) -> list[TrainingRunView]:
    return [run_view(session, run) for run in list_runs(session, principal.scope)]


@router.get("/{run_id}", response_model=TrainingRunView, responses=PROBLEMS)
def read_run(run_id: str, principal: TrainerDep, session: SessionDep) -> TrainingRunView:
    return run_view(session, find_run(session, run_id, principal.scope))


@router.post("/{run_id}/cancel", status_code=202, response_model=TrainingRunView, responses=PROBLEMS)
def cancel(run_id: str, principal: TrainerDep, session: SessionDep, store: StoreDep) -> TrainingRunView:
    """A queued run is cancelled at once; a running one stops within seconds (no version is registered)."""
    run = cancel_run(session, run_id, principal.scope)
    if run.status == RunStatus.cancelled and run.checkpoint_epoch is not None:
        # A run queued again to resume: no trainer will hold it now to delete its checkpoint.
        after_commit(session, partial(discard_checkpoint, store, run.id))
    return run_view(session, run)
