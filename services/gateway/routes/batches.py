"""Batches: many images in one request (multipart `files`, or one ZIP), tracked together."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from services.gateway.access import GuardedRoute
from services.gateway.deps import (
    CallbackSecretForm,
    CallbackUrlForm,
    CeleryDep,
    ClientRefForm,
    DatabaseDep,
    ExplainForm,
    IdempotencyKeyHeader,
    ListFilterDep,
    ModelForm,
    SessionDep,
    SettingsDep,
    StoreDep,
    SubmitterDep,
    WaiterDep,
)
from services.gateway.metrics import JOBS_SUBMITTED
from services.gateway.problems import PROBLEMS
from shared.db.session import Database
from shared.intake.uploads import batch_uploads
from shared.jobs.callbacks import check_callback
from shared.jobs.listing import BatchState, list_batches
from shared.jobs.submissions import submit_images
from shared.jobs.views import batch_view, study_report
from shared.schemas import BatchAccepted, BatchSummary, BatchView, JobAccepted

router = APIRouter(prefix="/v1/batches", tags=["batches"], route_class=GuardedRoute)


@router.post("", status_code=202, response_model=BatchAccepted, responses=PROBLEMS)
def submit_batch(
    principal: SubmitterDep,
    response: Response,
    settings: SettingsDep,
    session: SessionDep,
    store: StoreDep,
    celery: CeleryDep,
    files: Annotated[list[UploadFile], File(description="PNG/JPEG images, or a single ZIP of them.")],
    model: ModelForm = None,
    client_ref: ClientRefForm = None,
    callback_url: CallbackUrlForm = None,
    callback_secret: CallbackSecretForm = None,
    explain: ExplainForm = False,
    idempotency_key: IdempotencyKeyHeader = None,
) -> BatchAccepted:
    callback_url, callback_secret = check_callback(callback_url, callback_secret, settings, principal.organisation)
    uploads = batch_uploads(files, settings)
    submitted = submit_images(
        session,
        store,
        celery,
        settings,
        uploads,
        model_ref=model or settings.default_model,
        as_batch=True,
        client_ref=client_ref,
        idempotency_key=idempotency_key,
        organisation=principal.organisation,
        callback_url=callback_url,
        callback_secret=callback_secret,
        explain=explain,
    )
    batch, jobs = submitted.batch, submitted.jobs
    assert batch is not None
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        JOBS_SUBMITTED.labels(model=batch.model_name, kind="batch").inc(len(jobs))
    location = f"/v1/batches/{batch.id}"
    response.headers["Location"] = location
    return BatchAccepted(
        id=batch.id,
        location=location,
        total=len(jobs),
        job_ids=[job.id for job in jobs],
        jobs=[
            JobAccepted(id=job.id, status=job.status.value, filename=job.filename, location=f"/v1/jobs/{job.id}")
            for job in jobs
        ],
    )


@router.get("", response_model=list[BatchSummary], responses=PROBLEMS)
def list_all_batches(
    session: SessionDep,
    principal: SubmitterDep,
    where: ListFilterDep,
    state: Annotated[
        BatchState | None,
        Query(description="`active`: a job still queued or running, or a study still collecting; or `finished`."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[BatchSummary]:
    """Your batches and studies, newest first, with their counts and progress (jobs: `GET /v1/batches/{id}`)."""
    return list_batches(session, principal.scope, where, state=state, limit=limit)


@router.get("/{batch_id}", response_model=BatchView, responses=PROBLEMS)
async def read_batch(
    database: DatabaseDep,
    waiter: WaiterDep,
    batch_id: str,
    settings: SettingsDep,
    principal: SubmitterDep,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,9}$", description="From `next_cursor`.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    wait: Annotated[
        float, Query(ge=0, description="Long-poll: seconds to wait until every job of the batch has finished.")
    ] = 0,
) -> BatchView:
    args = (database, batch_id, int(cursor or 0), limit, principal.scope)
    with waiter.long_poll(min(wait, settings.max_wait_seconds)) as timeout:
        load = waiter.read if timeout > 0 else run_in_threadpool
        view = await load(_load_batch_view, *args)
        finished = view.status in FINISHED_BATCH_STATUSES
        if timeout > 0 and not finished and await waiter.wait_batch(batch_id, timeout):
            view = await load(_load_batch_view, *args)
    return view


FINISHED_BATCH_STATUSES = frozenset({"succeeded", "partially_failed", "failed", "cancelled"})


def _load_batch_view(database: Database, batch_id: str, cursor: int, limit: int, organisation: str | None) -> BatchView:
    with database.session() as session:
        return batch_view(session, batch_id, cursor, limit, organisation)


@router.get(
    "/{batch_id}/report",
    response_class=Response,
    responses={**PROBLEMS, 200: {"content": {"application/dicom": {}}, "description": "The DICOM SR (Part 10)."}},
)
def read_report(batch_id: str, session: SessionDep, store: StoreDep, principal: SubmitterDep) -> Response:
    """A study batch's result as a DICOM Comprehensive SR, once the study is stable and classified."""
    data = study_report(session, store, batch_id, principal.scope)
    return Response(
        data,
        media_type="application/dicom",
        headers={"Content-Disposition": f'attachment; filename="xrayq-{batch_id}.dcm"'},
    )
