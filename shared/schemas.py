"""Pydantic schemas for every response: the OpenAPI document is the contract."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
BatchStatusName = Literal["queued", "running", "succeeded", "partially_failed", "failed", "cancelled"]


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


class BatchView(BaseModel):
    id: str
    status: BatchStatusName
    model: ModelRef
    client_ref: str | None = None
    created_at: datetime
    total: int
    counts: BatchCounts
    progress: float = Field(description="Finished jobs / total, 0..1.")
    jobs: list[JobView]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")


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
