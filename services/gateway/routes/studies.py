"""Study batches over REST: DICOM instances grouped by study, across requests, with a stability timeout."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Path, Response, UploadFile

from services.gateway.access import GuardedRoute
from services.gateway.deps import (
    CallbackSecretForm,
    CallbackUrlForm,
    CeleryDep,
    ExplainForm,
    ModelForm,
    SessionDep,
    SettingsDep,
    StoreDep,
    SubmitterDep,
)
from services.gateway.metrics import JOBS_SUBMITTED
from services.gateway.problems import PROBLEMS
from shared.core.errors import XrayqError
from shared.intake.instances import Refused, accepted_instances, nonempty, study_files
from shared.jobs.callbacks import check_callback
from shared.jobs.studies import StudyIntake, add_instances, study_batch_ids
from shared.jobs.views import batch_view
from shared.schemas import BatchView, RefusedInstance, StudiesAccepted, StudyAccepted

router = APIRouter(prefix="/v1/studies", tags=["studies"], route_class=GuardedRoute)


@router.post("", status_code=202, response_model=StudiesAccepted, responses=PROBLEMS)
def submit_study_instances(
    principal: SubmitterDep,
    response: Response,
    settings: SettingsDep,
    session: SessionDep,
    store: StoreDep,
    celery: CeleryDep,
    files: Annotated[
        list[UploadFile], File(description="DICOM Part-10 radiographs (CR, DX, MG, IO) or secondary captures.")
    ],
    model: ModelForm = None,
    callback_url: CallbackUrlForm = None,
    callback_secret: CallbackSecretForm = None,
    explain: ExplainForm = False,
) -> StudiesAccepted:
    """Instances join their study's open batch (one per StudyInstanceUID and accession), also across
    requests; the batch closes once no instance arrived for the stability timeout, then its SR is made.
    If no file is accepted, the first refusal is the answer (its own 4xx code)."""
    callback_url, callback_secret = check_callback(callback_url, callback_secret, settings, principal.organisation)
    refused: list[Refused] = []
    # Checked one at a time as study intake stores them: the request's files are never all in memory.
    accepted = nonempty(accepted_instances(study_files(files, settings), settings, refused))
    if accepted is None:
        raise refused[0].error
    intake = add_instances(
        session,
        store,
        celery,
        settings,
        accepted,
        organisation=principal.organisation,
        source="rest",
        model_ref=model or settings.default_model,
        callback_url=callback_url,
        callback_secret=callback_secret,
        explain=explain,
    )
    if intake.batches:
        response.headers["Location"] = f"/v1/batches/{intake.batches[0].id}"
    return studies_accepted(intake, refused)


def studies_accepted(intake: StudyIntake, refused: list[Refused]) -> StudiesAccepted:
    for batch in intake.batches:
        JOBS_SUBMITTED.labels(model=batch.model_name, kind="study").inc(len(intake.jobs[batch.id]))
    return StudiesAccepted(
        studies=[
            StudyAccepted(
                batch_id=batch.id,
                location=f"/v1/batches/{batch.id}",
                study_instance_uid=batch.study_instance_uid or "",
                accession_number=batch.accession_number,
                job_ids=[job.id for job in intake.jobs[batch.id]],
            )
            for batch in intake.batches
        ],
        duplicates=intake.duplicates,
        refused=[
            RefusedInstance(
                filename=item.filename,
                code=item.error.code,
                detail=item.error.detail,
                sop_instance_uid=item.sop_instance_uid,
            )
            for item in refused
        ],
    )


@router.get("/{study_instance_uid}", response_model=list[BatchView], responses=PROBLEMS)
def read_study_batches(
    study_instance_uid: Annotated[str, Path(max_length=64, pattern=r"^[0-9.]+$")],
    session: SessionDep,
    principal: SubmitterDep,
) -> list[BatchView]:
    """The study batches of a study, oldest first (a late instance after the seal opens another)."""
    ids = study_batch_ids(session, study_instance_uid, principal.scope)
    if not ids:
        raise XrayqError("batch_not_found", f"No study batch for StudyInstanceUID {study_instance_uid}.")
    return [batch_view(session, batch_id, limit=100) for batch_id in ids]
