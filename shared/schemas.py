"""Pydantic schemas for every response: the OpenAPI document is the contract."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
BatchStatusName = Literal["collecting", "queued", "running", "succeeded", "partially_failed", "failed", "cancelled"]


class ModelRef(BaseModel):
    name: str
    version: int | None = Field(
        default=None, description="Null until a version answers, unless the request pinned one."
    )


class JobResult(BaseModel):
    label: str
    probabilities: dict[str, float]
    model: ModelRef


class JobError(BaseModel):
    code: str
    detail: str | None = None


class JobView(BaseModel):
    id: str
    status: JobStatusName
    filename: str
    batch_id: str | None = None
    position: int = 0
    media_type: str
    input_sha256: str | None = None
    client_ref: str | None = None
    model: ModelRef = Field(description="The model asked for; the one that answered is in `result.model`.")
    result: JobResult | None = None
    error: JobError | None = None
    warnings: list[dict[str, str]] = Field(
        default_factory=list, description="Why the model may not suit this input, e.g. `body_part_mismatch`."
    )
    dicom: dict[str, str] | None = Field(None, description="Identifying tags of a DICOM input.")
    attempts: int = 0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    timings: dict[str, float] | None = Field(
        None, description="Milliseconds: queue_ms, fetch_ms, preprocess_ms, inference_ms, total_ms; batch_size."
    )


class JobAccepted(BaseModel):
    id: str
    status: JobStatusName
    filename: str
    location: str


class BatchAccepted(BaseModel):
    id: str
    location: str
    total: int
    job_ids: list[str] = Field(description="In the order of the submitted files (or of the ZIP's entries).")
    jobs: list[JobAccepted]


class BatchCounts(BaseModel):
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


class StudyView(BaseModel):
    study_instance_uid: str
    accession_number: str | None = None
    source: str | None = Field(None, description="How its instances arrived: `dimse`, `stow` or `rest`.")
    stable: bool = Field(description="No instance arrived for the stability timeout: the study is complete.")
    last_instance_at: datetime | None = None
    stable_at: datetime | None = None


class DeliveryView(BaseModel):
    status: Literal["pending", "delivered", "failed"]
    attempts: int = 0
    target: str | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None


class ReportView(BaseModel):
    location: str = Field(description="GET it for the DICOM Structured Report (application/dicom).")
    sop_instance_uid: str


class BatchView(BaseModel):
    id: str
    status: BatchStatusName = Field(description="`collecting` while a study batch may still take instances.")
    model: ModelRef
    client_ref: str | None = None
    created_at: datetime
    total: int
    counts: BatchCounts
    progress: float = Field(description="Finished jobs / total, 0..1.")
    jobs: list[JobView]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")
    study: StudyView | None = Field(None, description="Set for study batches (DIMSE, STOW-RS, /v1/studies).")
    completed_at: datetime | None = Field(None, description="When the result (report, deliveries) was made.")
    report: ReportView | None = Field(None, description="The study's DICOM Structured Report, once made.")
    deliveries: dict[str, DeliveryView] = Field(
        default_factory=dict, description="`sr_store` (C-STORE to the destination AE) and `callback`."
    )


class ModelVersionView(BaseModel):
    name: str
    version: int
    architecture: str
    classes: list[str]
    is_active: bool
    created_at: datetime
    activated_at: datetime | None = None
    metrics: dict[str, Any]
    preprocessing: dict[str, Any]
    weights_sha256: str


class ModelView(BaseModel):
    name: str
    active_version: int | None
    classes: list[str]
    versions: list[ModelVersionView]


class Problem(BaseModel):
    """RFC 9457 problem details, with a stable machine-readable `code`."""

    type: str = "about:blank"
    title: str
    status: int
    code: str
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class ReadinessView(BaseModel):
    ready: bool
    checks: dict[str, dict[str, Any]]


class ApiKeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    organisation: str = Field(min_length=1, max_length=128)
    roles: list[Literal["submit", "train", "admin"]] = Field(min_length=1)


class ApiKeyView(BaseModel):
    id: str
    name: str
    organisation: str
    roles: list[str]
    key_prefix: str
    created_at: datetime
    revoked_at: datetime | None = None


class ApiKeyCreated(ApiKeyView):
    key: str = Field(description="The key itself: shown this once, stored only as a hash.")


class StudyAccepted(BaseModel):
    batch_id: str
    location: str
    study_instance_uid: str
    accession_number: str | None = None
    job_ids: list[str] = Field(description="Jobs added by this request (instances already in the batch are not).")


class RefusedInstance(BaseModel):
    filename: str
    code: str
    detail: str
    sop_instance_uid: str | None = None


class StudiesAccepted(BaseModel):
    studies: list[StudyAccepted]
    duplicates: list[str] = Field(
        default_factory=list, description="Files whose SOP instance was already in its open study batch."
    )
    refused: list[RefusedInstance] = Field(default_factory=list, description="Files that joined no study, and why.")
