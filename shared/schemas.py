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
    probabilities: dict[str, float] = Field(
        description="Each class's probability, calibrated on the version's validation split when `calibrated`."
    )
    model: ModelRef
    confidence: float = Field(description="The probability of `label` (calibrated when `calibrated`).")
    calibrated: bool = Field(
        description="Whether the answering version was calibrated (temperature scaling); false: plain softmax."
    )
    uncertainty: float | None = Field(
        None,
        description="0 (sure) to 1 (every class equally likely): the normalised predictive entropy, over Monte "
        "Carlo dropout samples of the head where the architecture has a dropout. Null when the version's card "
        "records no uncertainty threshold.",
    )
    uncertain: bool | None = Field(
        None,
        description="Whether `uncertainty` is above the version's threshold (chosen on its validation split); "
        "then `warnings` also has an `uncertain` entry. Null when `uncertainty` is.",
    )
    cached: bool = Field(
        False,
        description="Whether this answer is the one the same version already gave the same input bytes "
        "(sha256) sent earlier by the same organisation (the result cache, `XRAYQ_RESULT_CACHE`).",
    )


class JobError(BaseModel):
    code: str
    detail: str | None = None


ExplanationStatusName = Literal["pending", "succeeded", "failed"]


class ExplanationState(BaseModel):
    """Where a job's explanation stands (`GET /v1/jobs/{id}/explanation` has it once it succeeded)."""

    job_id: str
    status: ExplanationStatusName
    location: str = Field(description="`GET` it: the overlay PNG (or `?format=json`: the raw map).")
    error: JobError | None = Field(
        None, description="Why there is none: `explanation_unavailable`, `explanation_failed`, `job_not_succeeded`."
    )


class ExplanationOverlay(BaseModel):
    location: str = Field(description="The PNG: the heatmap blended over the image at the model's input size.")
    width: int
    height: int


class ExplanationView(BaseModel):
    """A job's Grad-CAM explanation: the raw map for clients that draw their own."""

    job_id: str
    status: Literal["succeeded"] = "succeeded"
    model: ModelRef = Field(description="The version that answered the job and was explained.")
    label: str = Field(description="The class explained: the job's answer.")
    method: str = Field(description="`grad-cam`.")
    target_layer: str = Field(description="The layer the map was taken at (from the version's card).")
    width: int = Field(description="Columns of `map`: the target layer's resolution.")
    height: int = Field(description="Rows of `map`.")
    map: list[list[float]] = Field(
        description="Rows top to bottom, each value in [0, 1]: how much the region pushes towards `label`."
    )
    overlay: ExplanationOverlay
    created_at: datetime | None = None


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
        default_factory=list,
        description="`{code, detail}` entries: why the model may not suit this input or answer, e.g. "
        "`out_of_distribution`, `underexposed`, `body_part_mismatch`, `uncertain` (README: Flags on results).",
    )
    dicom: dict[str, str] | None = Field(None, description="Identifying tags of a DICOM input.")
    attempts: int = 0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    timings: dict[str, float] | None = Field(
        None, description="Milliseconds: queue_ms, fetch_ms, preprocess_ms, inference_ms, total_ms; batch_size."
    )
    explanation: ExplanationState | None = Field(
        None, description="Its Grad-CAM explanation, if one was asked for (`explain=true`, or POST …/explanation)."
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
    target: str | None = Field(None, description="The callback URL, or the name of the SR destination (no address).")
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
    result_error: JobError | None = Field(
        None,
        description="Why the batch's result could not be made (`report_failed`): completed without a report, "
        "or, while `completed_at` is null, retried later.",
    )
    deliveries: dict[str, DeliveryView] = Field(
        default_factory=dict,
        description="`sr_store:<destination name>` (C-STORE to each SR destination of the batch's organisation) "
        "and `callback`.",
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
    dataset_id: str | None = None
    training_run_id: str | None = None
    evaluation: dict[str, Any] | None = Field(
        None, description="The evaluation report (test split, or the fixed held-out split), with calibration."
    )
    plots: dict[str, str] = Field(default_factory=dict, description="Plot name -> URL of its PNG.")
    card: dict[str, Any] = Field(default_factory=dict, description="The model card, as stored beside the weights.")
    calibration: dict[str, Any] = Field(
        default_factory=dict,
        description="`calibrated` and the card's temperature-scaling record, or `reason`: why results are not.",
    )
    uncertainty: dict[str, Any] = Field(
        default_factory=dict,
        description="`flags` and the card's uncertainty record (measure, threshold, how it was chosen), or `reason`.",
    )
    checks: dict[str, str] = Field(
        default_factory=dict,
        description="Which checks this version's results get (input_quality, out_of_distribution, "
        "inverted_polarity): `on: how`, or `off: why`.",
    )


class ModelView(BaseModel):
    name: str
    active_version: int | None
    classes: list[str]
    owner: str | None = Field(
        None,
        description="The organisation that owns it (registers into, promotes and rolls it back); null: shared, "
        "used by every organisation and changed by admins only.",
    )
    evaluation_set: dict[str, Any] | None = Field(
        None, description="The owner's held-out images `if_better` is judged on (owner and admins only)."
    )
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
    files: list[Any] | None = Field(None, description="The files a dataset upload was refused for, by name.")
    retry_after_s: int | None = Field(None, description="429: seconds to wait, as in the `Retry-After` header.")
    tensors: dict[str, list[str]] | None = Field(
        None,
        description="Imported weights refused: the offending tensors (first 20 of each kind): `missing`, "
        "`unexpected`, `mismatched` (name: dtype and shape given where the architecture has another), `not_finite`.",
    )


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


class CallbackSecretView(BaseModel):
    organisation: str | None
    secret: str = Field(
        description="Verifies `X-Xrayq-Signature` of this organisation's callbacks registered without a "
        "`callback_secret` of their own. Derived from the server secret; no other organisation's verifies with it."
    )


class SrDestinationCreate(BaseModel):
    organisation: str = Field(min_length=1, max_length=128, description="Only its studies' reports go there.")
    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Shown on its batches."
    )
    # Printable ASCII but the backslash (DICOM's value separator), no leading or trailing space.
    ae_title: str = Field(min_length=1, max_length=16, pattern=r"^[!-\[\]-~]([ -\[\]-~]*[!-\[\]-~])?$")
    host: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.:_-]+$")
    port: int = Field(ge=1, le=65535)


class SrDestinationView(SrDestinationCreate):
    id: str
    created_at: datetime


class ModelActivationView(BaseModel):
    name: str
    version: int
    previous_version: int | None
    reason: str
    actor: str | None = Field(description="`training-run:<id>`, or the organisation of the key that promoted.")
    actor_key_id: str | None = Field(None, description="The API key whose request made the change.")
    actor_organisation: str | None = None
    created_at: datetime


class EvaluationSetRequest(BaseModel):
    dataset: str = Field(min_length=1, max_length=200, description="Dataset id, name (latest version) or name@version.")
    split: Literal["test", "val"] | None = Field(None, description="Default: `test`, or `val` when it has none.")


class EvaluationSetView(BaseModel):
    """The held-out images `if_better` runs of a model are judged on."""

    dataset_id: str
    split: str
    classes: list[str]
    n: int


class PromoteRequest(BaseModel):
    version: int | None = Field(None, ge=1, description="The version of this model to make active.")
    model_version_id: str | None = Field(None, description="Or the version's id; it must belong to this model.")


# --- datasets ---------------------------------------------------------------------------------------


class DatasetView(BaseModel):
    id: str
    name: str
    version: int
    parent_id: str | None = None
    classes: list[str]
    counts: dict[str, dict[str, int]] = Field(description="Images per split and class.")
    files: int
    size_bytes: int
    manifest_sha256: str
    details: dict[str, Any] = Field(description="Source format, layout, files left out, what it extends.")
    created_at: datetime


# --- training runs ----------------------------------------------------------------------------------

PromotionPolicy = Literal["manual", "if_better", "always", "if_none_active"]


class TrainingRunCreate(BaseModel):
    """A training run. Left-out options take the recommended chest X-ray recipe (see the README)."""

    dataset: str = Field(min_length=1, max_length=200, description="Dataset id, name (latest version) or name@version.")
    model_name: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="Default: the dataset's name."
    )
    architecture: str | None = Field(
        None, description="Any torchvision classification model; default mobilenet_v3_large."
    )
    base_model: str | None = Field(None, description="name@version to fine-tune from (same architecture).")
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=2, le=1024)
    learning_rate: float = Field(2e-3, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    image_size: int | None = Field(None, ge=16, le=1024, description="Default 176, or the base model's.")
    color: Literal["auto", "grayscale", "rgb"] = "auto"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    class_balance: Literal["sampler", "loss_weights", "none"] | None = Field(
        None,
        description="sampler (class-balanced batches; the default), loss_weights (inverse-frequency loss), none.",
    )
    class_weighting: bool | None = Field(
        None, description="Older name: true = class_balance loss_weights, false = none; class_balance wins."
    )
    normalization: Literal["fixed", "clahe_standardize"] | None = Field(
        None, description="Preprocessing normalisation; default clahe_standardize, or the base model's."
    )
    augment: bool = True
    val_fraction: float = Field(0.1, gt=0, lt=0.9, description="Used when the dataset has no val split.")
    max_per_class: int | None = Field(None, ge=1, description="Use at most N training images per class.")
    promotion: PromotionPolicy = Field(
        "manual",
        description="manual; if_better (than the active version, on the same evaluation set); always; "
        "if_none_active (when no version of the model is active).",
    )
    intended_use: dict[str, list[str]] | None = Field(
        None, description='DICOM inputs the model is made for, e.g. {"body_parts": ["CHEST"], "modalities": ["CR"]}.'
    )


class RunProgress(BaseModel):
    phase: str | None = Field(None, description="queued, loading, training, evaluating, registering, done.")
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    percent: float | None = None
    eta_seconds: float | None = None
    elapsed_seconds: float | None = None


class TrainingRunView(BaseModel):
    id: str
    status: JobStatusName  # a run goes through a job's lifecycle
    dataset_id: str
    model_name: str
    config: dict[str, Any]
    promotion: PromotionPolicy
    progress: RunProgress
    history: list[dict[str, Any]] = Field(description="Per epoch: train_loss, val_loss, val_accuracy, val_roc_auc.")
    model: ModelRef | None = Field(None, description="The version this run produced.")
    evaluation: dict[str, Any] | None = None
    promotion_decision: dict[str, Any] | None = None
    error: JobError | None = None
    cancel_requested: bool = False
    checkpoint_epoch: int | None = Field(
        None, description="The last epoch checkpointed: where the run continues if its trainer stops."
    )
    resumes: int = Field(0, description="Times the run was queued again after its trainer was lost.")
    handbacks: int = Field(0, description="Times a stopping trainer (SIGTERM, a redeploy) handed the run back.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


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


# --- the dashboard ------------------------------------------------------------------------------------


class SessionView(BaseModel):
    """Who the dashboard acts for. The session token itself is only ever in the HttpOnly cookie."""

    open_mode: bool = Field(description="No API keys (the embedded mode on loopback): no session is needed.")
    organisation: str | None = None
    roles: list[str]
    expires_at: datetime | None = None
    csrf_token: str | None = Field(
        None, description="Send as `X-Xrayq-CSRF` with every state change made with the session cookie."
    )


class ModelDownloadView(BaseModel):
    name: str
    version: int
    file: Literal["weights", "card"]
    api_key_id: str | None = Field(None, description="The key that downloaded it (null: the bootstrap admin key).")
    organisation: str | None = None
    created_at: datetime


class BatchSummary(BaseModel):
    """A batch as a list shows it: its counts and progress, not its jobs (`GET /v1/batches/{id}`)."""

    id: str
    status: BatchStatusName
    model: ModelRef
    client_ref: str | None = None
    created_at: datetime
    total: int
    counts: BatchCounts
    progress: float
    study_instance_uid: str | None = None
    completed_at: datetime | None = None


class RouteLatency(BaseModel):
    method: str
    route: str = Field(description="The route's template, e.g. `/v1/jobs/{job_id}`.")
    count: float
    p50: float | None = Field(None, description="Seconds (from the histogram's buckets, as Prometheus computes it).")
    p90: float | None = None
    p99: float | None = None


class ActiveVersionView(BaseModel):
    model: str
    version: int
    architecture: str


class OperationsView(BaseModel):
    """The numbers `/metrics` serves, summarised; rates are the difference of two snapshots."""

    jobs_by_status: dict[str, float] = Field(description="Jobs in the database by status (every organisation).")
    jobs_finished: float = Field(description="succeeded + failed + cancelled: its change over time is throughput.")
    job_error_rate: float | None = Field(None, description="failed / (succeeded + failed); null before any.")
    jobs_submitted: dict[str, float] = Field(description="Accepted by this gateway process since it started, by kind.")
    http_requests: float = Field(description="Answered by this gateway process since it started.")
    http_error_rate: float | None = Field(None, description="Share of those answered with a 5xx.")
    latency: list[RouteLatency] = Field(description="This process's busiest routes first.")
    queue_depths: dict[str, float]
    workers: dict[str, float] = Field(description="Worker processes answering a ping, by queue (predict, train).")
    active_versions: list[ActiveVersionView]


class AuditEventView(BaseModel):
    id: str
    sequence: int
    occurred_at: datetime
    action: str = Field(description="A stable code: `auth.failed`, `key.created`, `key.revoked`, ...")
    outcome: Literal["success", "failure"]
    actor_key_id: str | None = Field(description="The acting API key (null: bootstrap admin, open mode, unknown).")
    organisation: str | None
    source_address: str | None
    entity_type: str | None
    entity_id: str | None
    detail: dict[str, Any] | None
    prev_hash: str
    hash: str


class AuditEventPage(BaseModel):
    events: list[AuditEventView]
    next_cursor: int | None = Field(description="Pass as `cursor` for the next page (null: no more).")


class AuditChainCheck(BaseModel):
    ok: bool
    events: int = Field(description="How many events were checked before the first break (all of them if ok).")
    first_broken_sequence: int | None = Field(description="The first event whose hash or link does not hold.")
