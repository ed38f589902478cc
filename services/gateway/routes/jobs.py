"""Single-image jobs: submit, look up (with long-polling), list."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from celery import Celery
from fastapi import APIRouter, File, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from services.gateway.access import GuardedRoute
from services.gateway.deps import (
    AdmissionDep,
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
from services.gateway.uploads import read_upload
from shared.core.settings import Settings
from shared.core.storage import ObjectStore
from shared.db.models import TERMINAL_STATUSES
from shared.db.session import Database
from shared.intake.images import check_file
from shared.intake.upload import Upload
from shared.intake.uploads import clean_filename
from shared.jobs.lifecycle import cancel_job
from shared.jobs.listing import list_jobs as listed_jobs
from shared.jobs.submissions import Submitted, submit_images
from shared.jobs.views import get_job, job_view
from shared.schemas import JobAccepted, JobView

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=GuardedRoute)


@router.post("", status_code=202, response_model=JobAccepted, responses=PROBLEMS)
async def submit_job(
    admission: AdmissionDep,
    principal: SubmitterDep,
    response: Response,
    settings: SettingsDep,
    database: DatabaseDep,
    store: StoreDep,
    celery: CeleryDep,
    file: Annotated[UploadFile, File(description="A PNG or JPEG image (identified by content).")],
    model: ModelForm = None,
    client_ref: ClientRefForm = None,
    explain: ExplainForm = False,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobAccepted:
    filename = clean_filename(file.filename, "upload")
    data = await read_upload(file, settings.max_file_bytes, filename)
    upload = check_file(filename, data, settings)
    if upload.error is not None:
        raise upload.error
    model_ref = model or settings.default_model
    replayed = False
    if idempotency_key is None:
        # The common case goes through the gateway's group commit (see services/gateway/admission.py).
        job = await admission.submit(
            upload, model_ref=model_ref, client_ref=client_ref, organisation=principal.organisation, explain=explain
        )
    else:
        submitted = await run_in_threadpool(
            partial(_submit_idempotent, database, store, celery, settings, upload),
            model_ref=model_ref,
            client_ref=client_ref,
            idempotency_key=idempotency_key,
            organisation=principal.organisation,
            explain=explain,
        )
        job, replayed = submitted.jobs[0], submitted.replayed
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        JOBS_SUBMITTED.labels(model=job.model_name, kind="single").inc()
    location = f"/v1/jobs/{job.id}"
    response.headers["Location"] = location
    return JobAccepted(id=job.id, status=job.status.value, filename=job.filename, location=location)


def _submit_idempotent(
    database: Database,
    store: ObjectStore,
    celery: Celery,
    settings: Settings,
    upload: Upload,
    **options: Any,
) -> Submitted:
    """Idempotent submissions check and record their key in the transaction that creates the job."""
    with database.session() as session:
        return submit_images(session, store, celery, settings, [upload], as_batch=False, **options)


@router.get("/{job_id}", response_model=JobView, responses=PROBLEMS)
async def read_job(
    database: DatabaseDep,
    waiter: WaiterDep,
    job_id: str,
    settings: SettingsDep,
    principal: SubmitterDep,
    wait: Annotated[float, Query(ge=0, description="Long-poll: seconds to wait for a terminal state.")] = 0,
) -> JobView:
    with waiter.long_poll(min(wait, settings.max_wait_seconds)) as timeout:
        load = waiter.read if timeout > 0 else run_in_threadpool
        view = await load(_load_view, database, job_id, principal.scope)
        if timeout > 0 and view.status not in TERMINAL_NAMES:
            finished = await waiter.wait(job_id, timeout)
            view = finished if finished is not None else await load(_load_view, database, job_id, principal.scope)
    return view


TERMINAL_NAMES = frozenset(status.value for status in TERMINAL_STATUSES)


def _load_view(database: Database, job_id: str, organisation: str | None) -> JobView:
    with database.session() as session:
        return job_view(get_job(session, job_id, organisation))


@router.delete("/{job_id}", response_model=JobView, responses=PROBLEMS)
def cancel(job_id: str, session: SessionDep, principal: SubmitterDep) -> JobView:
    """Cancel a queued job (409 `job_not_cancellable` once a worker has it)."""
    return job_view(cancel_job(session, job_id, principal.scope))


@router.get("", response_model=list[JobView], responses=PROBLEMS)
def list_jobs(
    session: SessionDep,
    principal: SubmitterDep,
    where: ListFilterDep,
    status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
    batch_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[JobView]:
    """Your jobs, newest first, narrowed by status, batch, model, client reference and submission time."""
    jobs = listed_jobs(session, principal.scope, where, status=status, batch_id=batch_id, limit=limit)
    return [job_view(job) for job in jobs]
