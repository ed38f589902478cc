"""DICOMweb STOW-RS (PS3.18 10.5): `POST /dicomweb/studies` with multipart/related; type="application/dicom".

The instances become study batches exactly as over DIMSE or /v1/studies. The answer is the standard
Store Instances Response (application/dicom+json): ReferencedSOPSequence for stored instances,
FailedSOPSequence with a FailureReason for the others; 200 when all were stored, 202 when some were,
409 when none was. The study batches are named in `Location` (the first) and `X-Xrayq-Batches`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from celery import Celery
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydicom import Dataset

from services.gateway.access import GuardedRoute
from services.gateway.deps import CeleryDep, DatabaseDep, SettingsDep, StoreDep, SubmitterDep
from services.gateway.problems import PROBLEMS
from services.gateway.related_parts import RelatedPart, close_parts, read_related_parts
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectStore
from shared.db.session import Database
from shared.imaging.dicom import read_header
from shared.intake import refusals
from shared.intake.instances import Refused, accepted_instances, nonempty, refusal
from shared.intake.upload import Upload
from shared.intake.uploads import check_file_count
from shared.jobs.studies import add_instances

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], route_class=GuardedRoute)
DICOM_JSON = "application/dicom+json"

# PS3.18 Table 10.5.3-3 failure reasons, by the xrayq code of the refusal.
FAILURE_REASON = {
    "file_too_large": 0xA700,  # Refused: Out of Resources
    "dicom_unsupported_transfer_syntax": 0xC122,  # Referenced Transfer Syntax not supported
    "dicom_sop_class_not_supported": 0x0122,  # Referenced SOP Class not supported
}
CANNOT_UNDERSTAND = 0xC000


@router.post(
    "/studies",
    status_code=200,
    response_class=JSONResponse,
    responses={
        **PROBLEMS,
        200: {"content": {DICOM_JSON: {}}, "description": "All instances stored."},
        202: {"content": {DICOM_JSON: {}}, "description": "Some instances stored; the others in FailedSOPSequence."},
        409: {"content": {DICOM_JSON: {}}, "description": "No instance stored; each in FailedSOPSequence."},
    },
)
async def store_instances(
    request: Request,
    principal: SubmitterDep,
    settings: SettingsDep,
    database: DatabaseDep,
    store: StoreDep,
    celery: CeleryDep,
) -> Response:
    """Store Instances (STOW-RS). Send `Content-Type: multipart/related; type="application/dicom";
    boundary=...`, one Part-10 instance per part."""
    boundary = _boundary(request.headers.get("content-type", ""))
    # Streamed into one spooled file per part (the request cap applies as it arrives): the body is never
    # in memory whole, and each part is read only when its turn comes.
    parts = await read_related_parts(request.stream(), boundary)
    try:
        check_file_count(len(parts), settings)
        destination = Destination(settings, database, store, celery, principal.organisation)
        return await run_in_threadpool(_store, destination, parts)
    finally:
        close_parts(parts)


@dataclass(frozen=True)
class Destination:
    """Where accepted instances go, and for whom."""

    settings: Settings
    database: Database
    store: ObjectStore
    celery: Celery
    organisation: str | None


def _store(destination: Destination, parts: list[RelatedPart]) -> Response:
    settings = destination.settings
    refused: list[Refused] = []
    stored: list[Dataset] = []  # ReferencedSOPSequence
    # Each part is read and checked as study intake takes it, stored, and let go before the next.
    instances = nonempty(accepted_instances(_dicom_parts(parts, refused), settings, refused))
    intake = None
    if instances is not None:
        with destination.database.session() as session:
            intake = add_instances(
                session,
                destination.store,
                destination.celery,
                settings,
                _referenced(instances, stored),
                organisation=destination.organisation,
                source="stow",
                model_ref=settings.default_model,
            )
    response = Dataset()
    response.RetrieveURL = ""  # Type 2: this server offers no WADO-RS retrieval
    if stored:
        response.ReferencedSOPSequence = stored
    if refused:
        response.FailedSOPSequence = [_failure(item) for item in refused]
    status = 200 if not refused else (202 if stored else 409)
    headers = {}
    if intake and intake.batches:
        headers["Location"] = f"/v1/batches/{intake.batches[0].id}"
        headers["X-Xrayq-Batches"] = ",".join(batch.id for batch in intake.batches)
    return JSONResponse(response.to_json_dict(), status_code=status, media_type=DICOM_JSON, headers=headers)


def _dicom_parts(parts: list[RelatedPart], refused: list[Refused]) -> Iterator[tuple[str, bytes]]:
    """The parts as named instances, each read when taken; a part of another declared type is refused."""
    for index, part in enumerate(parts):
        filename, content_type, data = f"stow-part-{index + 1}", part.content_type, part.read()
        # A part without a Content-Type takes the request's type="application/dicom".
        if content_type and content_type.split(";")[0].strip().lower() != "application/dicom":
            error = refusals.dicom_required(f"Part {index + 1} is {content_type}, not application/dicom.")
            refused.append(refusal(filename, data, error))
            continue
        yield filename, data


def _referenced(instances: Iterator[Upload], stored: list[Dataset]) -> Iterator[Upload]:
    """The instances, each noted for the answer as it goes to study intake."""
    for upload in instances:
        header = read_header(upload.data)
        item = Dataset()
        item.ReferencedSOPClassUID = header.SOPClassUID
        item.ReferencedSOPInstanceUID = header.SOPInstanceUID
        stored.append(item)
        yield upload


def _failure(item: Refused) -> Dataset:
    failure = Dataset()
    failure.ReferencedSOPClassUID = item.sop_class_uid or ""
    failure.ReferencedSOPInstanceUID = item.sop_instance_uid or ""
    failure.FailureReason = FAILURE_REASON.get(item.error.code, CANNOT_UNDERSTAND)
    return failure


_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


def _boundary(content_type: str) -> str:
    media = content_type.split(";")[0].strip().lower()
    if media != "multipart/related":
        raise XrayqError("unsupported_media_type", 'Send multipart/related; type="application/dicom".')
    kind = re.search(r'type="?([^";]+)"?', content_type.split(";", 1)[1] if ";" in content_type else "")
    if kind is not None and kind.group(1).strip().lower() != "application/dicom":
        raise XrayqError("unsupported_media_type", f"Only application/dicom parts are stored, not {kind.group(1)}.")
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise XrayqError("multipart_unreadable", "The multipart/related Content-Type has no boundary.")
    return match.group(1) or match.group(2)
