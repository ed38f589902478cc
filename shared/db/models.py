"""Typed SQLAlchemy models: the source of truth for every job, batch and model version."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, overload

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def as_utc(moment: datetime) -> datetime: ...
@overload
def as_utc(moment: None) -> None: ...
def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class ExplanationStatus(enum.StrEnum):
    """A job's explanation (see `shared.jobs.explanations`); a job never asked for one has none."""

    pending = "pending"
    succeeded = "succeeded"
    failed = "failed"


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    model_name: Mapped[str] = mapped_column(String(128))
    total: Mapped[int] = mapped_column(Integer)
    client_ref: Mapped[str | None] = mapped_column(String(256))
    # Who submitted it: clients see only their organisation's batches (None: open mode).
    organisation: Mapped[str | None] = mapped_column(String(128), index=True)

    # Study batches: the instances of one study (StudyInstanceUID + accession), gathered from any number
    # of requests or associations until none has arrived for `study_stable_after_s`.
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(16))  # "dimse", "stow" or "rest"
    # Set while the study still takes instances; unique, so concurrent arrivals find one open batch.
    # NULL once sealed (NULLs never collide): a late instance opens a new batch for the same study.
    open_study_key: Mapped[str | None] = mapped_column(String(300), unique=True, index=True)
    last_instance_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stable_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # REST clients' signed callback, called once the batch is complete.
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    callback_secret: Mapped[str | None] = mapped_column(String(256))

    # The result once every job is finished (and a study is stable): the SR, and its deliveries
    # ({"sr_store": {...}, "callback": {...}}: status, attempts, last error); `delivery_due_at` is when
    # the next pending delivery should be tried (NULL: none pending).
    result_pending: Mapped[bool | None] = mapped_column(Boolean, index=True)  # True until completed
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    report_key: Mapped[str | None] = mapped_column(String(256))
    report_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    deliveries: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    delivery_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)

    jobs: Mapped[list[Job]] = relationship(back_populates="batch", order_by="Job.position")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_batch_position", "batch_id", "position"),
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_input_sha256_model_version", "input_sha256", "model_version_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status", native_enum=False, length=16), default=JobStatus.queued
    )
    filename: Mapped[str] = mapped_column(String(512))
    media_type: Mapped[str] = mapped_column(String(64))
    input_key: Mapped[str | None] = mapped_column(String(256))
    input_sha256: Mapped[str | None] = mapped_column(String(64))
    input_bytes: Mapped[int] = mapped_column(Integer, default=0)
    client_ref: Mapped[str | None] = mapped_column(String(256))
    organisation: Mapped[str | None] = mapped_column(String(128), index=True)

    # What was asked for: a model name, optionally pinned to one version.
    model_name: Mapped[str] = mapped_column(String(128))
    model_version_requested: Mapped[int | None] = mapped_column(Integer)
    # What answered.
    model_version_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))

    label: Mapped[str | None] = mapped_column(String(128))
    probabilities: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # How sure the answer is: the calibrated probability of `label`; whether the version was calibrated;
    # its uncertainty in [0, 1] and whether that passed the version's threshold (null: no threshold).
    confidence: Mapped[float | None] = mapped_column(Float)
    calibrated: Mapped[bool | None] = mapped_column(Boolean)
    uncertainty: Mapped[float | None] = mapped_column(Float)
    uncertain: Mapped[bool | None] = mapped_column(Boolean)
    # The earlier job of the same organisation whose result this one repeats: the same input bytes,
    # answered by the same version (`shared/jobs/result_cache.py`). None: computed for this job.
    cached_from: Mapped[str | None] = mapped_column(String(36))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # DICOM inputs: the identifying tags (study, series, instance, accession, modality, body part, view).
    dicom: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Why the answering model may not suit this input (e.g. an extremity sent to a chest model).
    warnings: Mapped[list[Any] | None] = mapped_column(JSON)
    # Its Grad-CAM explanation (`shared.jobs.explanations`): None, never asked for; "pending" (asked at
    # submission or later), "succeeded" or "failed". `explanation` says what was made and by which
    # version (object keys, target layer, sizes), or why not (code, detail).
    explanation_status: Mapped[ExplanationStatus | None] = mapped_column(
        Enum(ExplanationStatus, name="explanation_status", native_enum=False, length=16)
    )
    explanation: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    batch: Mapped[Batch | None] = relationship(back_populates="jobs")
    model_version: Mapped[ModelVersion | None] = relationship()


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    architecture: Mapped[str] = mapped_column(String(64))
    classes: Mapped[list[Any]] = mapped_column(JSON)
    weights_key: Mapped[str] = mapped_column(String(256))
    card_key: Mapped[str] = mapped_column(String(256))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    card: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    is_active: Mapped[bool] = mapped_column(Boolean, default=False)
    # Provenance: the dataset version and training run that produced it (None for `xrayq train`).
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", name="fk_model_versions_dataset_id"))
    training_run_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IdempotencyKey(Base):
    """A client's Idempotency-Key: the same key and request give back the same jobs, never new ones."""

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(16))  # "job" or "batch"
    resource_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key: only its sha256 is stored (the key itself is shown once, at creation)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128))
    organisation: Mapped[str] = mapped_column(String(128))
    roles: Mapped[list[Any]] = mapped_column(JSON)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SrDestination(Base):
    """A PACS that receives the Structured Reports of one organisation's studies, and no one else's."""

    __tablename__ = "sr_destinations"
    __table_args__ = (UniqueConstraint("organisation", "name", name="uq_sr_destinations_organisation_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    organisation: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(64))  # what the organisation's batch views show
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Dataset(Base):
    """An immutable, labelled dataset version: a manifest in storage lists every file with its label.

    Versions are per name. A version that extends another lists the other's files too, so retraining
    never loses the original data; the files themselves are stored once, by content.
    """

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_datasets_name_version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    classes: Mapped[list[Any]] = mapped_column(JSON)
    # {"train": {"NORMAL": 1341, ...}, "test": {...}}
    counts: Mapped[dict[str, Any]] = mapped_column(JSON)
    files: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    manifest_key: Mapped[str] = mapped_column(String(256))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    # Where it came from and what was done to it (source format, skipped files, de-identification).
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    organisation: Mapped[str | None] = mapped_column(String(128), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# A training run goes through the same lifecycle as a job.
RunStatus = JobStatus


class TrainingRun(Base):
    """A queued training run: its recipe, live progress, and the model version it produced."""

    __tablename__ = "training_runs"
    __table_args__ = (Index("ix_training_runs_status_created", "status", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    status: Mapped[RunStatus] = mapped_column(
        Enum(RunStatus, name="run_status", native_enum=False, length=16), default=RunStatus.queued
    )
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    model_name: Mapped[str] = mapped_column(String(128))
    base_model_version_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    promotion: Mapped[str] = mapped_column(String(16))  # manual, if_better, always, if_none_active
    # {"phase", "epoch", "epochs", "step", "steps", "percent", "eta_seconds"}
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    history: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # What the promotion policy decided, and on which figures.
    promotion_decision: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    model_version_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)
    trainer: Mapped[str | None] = mapped_column(String(256))  # host:pid:claim of the trainer that runs it
    # The last epoch checkpointed to the object store (`shared.training.checkpoints`); None: none yet.
    checkpoint_epoch: Mapped[int | None] = mapped_column(Integer)
    # Requeued after its trainer was lost (at most `run_max_resumes`), and given back by a stopping trainer.
    resumes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    handbacks: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    organisation: Mapped[str | None] = mapped_column(String(128), index=True)
    # Whose models the run may register into: the submitting key's organisation; None for an admin's or a
    # local command's run (any model; a new name becomes shared). Checked again by the trainer.
    model_scope: Mapped[str | None] = mapped_column(String(128))
    api_key_id: Mapped[str | None] = mapped_column(String(36))  # the key that submitted it (None: bootstrap/open)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Written by the trainer every few seconds; a running run without one for long has lost its trainer.
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ModelActivation(Base):
    """Every change of a model name's active version: the audit trail, and what rollback returns to."""

    __tablename__ = "model_activations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    model_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    version: Mapped[int] = mapped_column(Integer)
    previous_version: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(64))  # first_version, promote, rollback, policy:if_better, ...
    actor: Mapped[str | None] = mapped_column(String(128))  # "training-run:<id>", or the key's organisation
    # The API key whose request made the change (a run's: the key that submitted the run), and its organisation.
    actor_key_id: Mapped[str | None] = mapped_column(String(36))
    actor_organisation: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RegisteredModel(Base):
    """A model name: who owns it, and the held-out set its versions are compared on.

    The first version registered under a name makes the registering organisation its owner; an admin's
    (or the open mode's) first version makes it shared (`owner` None). Only the owner or an admin may
    register into, promote or roll back a model; jobs may use shared models and their own organisation's.
    """

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(128), index=True)
    # The owner's held-out images `if_better` is judged on, whoever submits the run:
    # {"key", "sha256", "dataset_id", "split", "n", "classes"}; None until a version records one.
    evaluation_set: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BrowserSession(Base):
    """A web page's stand-in for an API key: the key is exchanged once for a random session token kept
    in an HttpOnly cookie; only the token's sha256 is stored, and it expires on its own."""

    __tablename__ = "browser_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The key it was opened with: revoking the key ends its sessions. None: the bootstrap admin key,
    # whose hash is then kept, so a changed XRAYQ_ADMIN_KEY ends them too.
    api_key_id: Mapped[str | None] = mapped_column(String(36), index=True)
    bootstrap_key_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class ModelDownload(Base):
    """Who took a model version's files out of the registry (weights, card), and when."""

    __tablename__ = "model_downloads"
    __table_args__ = (Index("ix_model_downloads_name_created", "name", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    model_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    file: Mapped[str] = mapped_column(String(16))  # "weights" or "card"
    api_key_id: Mapped[str | None] = mapped_column(String(36))  # None: the bootstrap admin key or open mode
    organisation: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """One security-relevant event, append-only and hash-chained (`shared/audit/`)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_action_sequence", "action", "sequence"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    sequence: Mapped[int] = mapped_column(BigInteger, unique=True)  # 1, 2, 3... in the order recorded
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    action: Mapped[str] = mapped_column(String(64))  # a stable code: `auth.failed`, `key.created`, ...
    outcome: Mapped[str] = mapped_column(String(16))  # "success" or "failure"
    actor_key_id: Mapped[str | None] = mapped_column(String(36))  # None: bootstrap admin, open mode, unknown
    organisation: Mapped[str | None] = mapped_column(String(128))
    source_address: Mapped[str | None] = mapped_column(String(64))
    entity_type: Mapped[str | None] = mapped_column(String(32))
    entity_id: Mapped[str | None] = mapped_column(String(64), index=True)
    # Codes and counts only: never patient identifiers, image bytes or secrets.
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
