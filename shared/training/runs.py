"""Training runs: queued by the gateway, executed by a trainer, watched and cancelled through the API.

The row is the durable record of a run. The trainer claims it (queued -> running) in one conditional
UPDATE, so a message delivered twice never starts a second execution; it writes progress and a heartbeat
every few seconds and learns of a cancellation from the same row. Each epoch ends with a checkpoint in
the object store (`shared.training.checkpoints`), its epoch on the row. A running run whose heartbeat
stops lost its trainer: the reconciler queues it again, to continue from that checkpoint, up to
`run_max_resumes` times, then fails it with `trainer_lost`; a trainer that is stopping (SIGTERM, a
redeploy) hands its run back the same way, without counting against that budget. Every write of the
trainer's names its claim (`trainer`), so a trainer presumed lost that wakes up again cannot touch the
run another trainer has taken since.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.queue import TRAIN_QUEUE, TRAIN_RUN_TASK
from shared.core.settings import Settings
from shared.db.models import ModelVersion, RunStatus, TrainingRun, as_utc, utcnow
from shared.models.architectures import check_architecture
from shared.models.ownership import check_may_manage, check_may_use
from shared.models.registry import parse_model_ref, resolve_version
from shared.schemas import JobError, ModelRef, RunProgress, TrainingRunCreate, TrainingRunView
from shared.training.datasets import find_dataset

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

# The recommended recipe's net and size: the best figures we could train within an hour on a 2-core CPU
# (MobileNetV3-large runs ~1.7x faster than ResNet-18 on CPU at the same size).
RECOMMENDED_ARCHITECTURE = "mobilenet_v3_large"
DEFAULT_IMAGE_SIZE = 176
# Its preprocessing and class balance: what held under shift in the issue-13 spike (research/shift-spike).
RECOMMENDED_NORMALIZATION = "clahe_standardize"
RECOMMENDED_CLASS_BALANCE = "sampler"
# What the trainer's TrainConfig takes from a request.
CONFIG_FIELDS = (
    "architecture",
    "image_size",
    "color",
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "label_smoothing",
    "class_balance",
    "normalization",
    "augment",
    "val_fraction",
    "seed",
    "max_per_class",
)


def create_run(
    session: Session,
    settings: Settings,
    request: TrainingRunCreate,
    organisation: str | None = None,
    *,
    model_scope: str | None,
    api_key_id: str | None = None,
) -> TrainingRun:
    """Validate everything a trainer would trip over later, then add the queued row (flushed).

    `model_scope` is the submitter's `Principal.scope`: the run may fine-tune from models it may use and
    register only into its organisation's models or a new name (None: an admin, any model).
    """
    dataset = find_dataset(session, request.dataset, organisation)
    model_name = request.model_name or dataset.name
    check_may_manage(session, model_name, model_scope)
    if request.epochs > settings.max_training_epochs:
        raise XrayqError(
            "invalid_parameter", f"epochs must be at most {settings.max_training_epochs}, not {request.epochs}."
        )
    base: ModelVersion | None = None
    architecture = request.architecture
    image_size = request.image_size
    if request.base_model:
        name, version = parse_model_ref(request.base_model)
        check_may_use(session, name, model_scope)
        base = resolve_version(session, name, version)
        if architecture is not None and architecture != base.architecture:
            raise XrayqError(
                "base_model_mismatch",
                f"{base.name}@{base.version} is a {base.architecture}; it cannot be fine-tuned as {architecture}.",
            )
        architecture = base.architecture
        image_size = image_size or int(base.card["preprocessing"]["size"])
    architecture = check_architecture(architecture or RECOMMENDED_ARCHITECTURE, image_size or DEFAULT_IMAGE_SIZE)
    # A fine-tuned model keeps the normalisation its weights learned on, unless told otherwise.
    normalization = request.normalization or (
        base.card["preprocessing"].get("normalization", "fixed") if base is not None else RECOMMENDED_NORMALIZATION
    )
    values = request.model_dump()
    config = {key: values[key] for key in CONFIG_FIELDS if key in values}
    config.update(
        architecture=architecture,
        image_size=image_size or DEFAULT_IMAGE_SIZE,
        normalization=normalization,
        class_balance=class_balance_of(values),
    )
    if request.intended_use:
        config["intended_use"] = {k: [v.upper() for v in vs] for k, vs in request.intended_use.items()}
    run = TrainingRun(
        status=RunStatus.queued,
        dataset_id=dataset.id,
        model_name=model_name,
        base_model_version_id=base.id if base else None,
        config=config,
        promotion=request.promotion,
        progress={"phase": "queued"},
        history=[],
        cancel_requested=False,
        organisation=organisation,
        model_scope=model_scope,
        api_key_id=api_key_id,
    )
    session.add(run)
    session.flush()
    return run


def class_balance_of(config: dict[str, Any]) -> str:
    """A request's or a stored run's class balance; `class_weighting` (the older boolean) when it has none."""
    if config.get("class_balance"):
        return str(config["class_balance"])
    if config.get("class_weighting") is not None:
        return "loss_weights" if config["class_weighting"] else "none"
    return RECOMMENDED_CLASS_BALANCE


def publish_run(celery: Celery, run_id: str) -> bool:
    """Put the run on queue `train` (after commit). A failed publish leaves it queued for the reconciler."""
    try:
        celery.send_task(TRAIN_RUN_TASK, args=[run_id], queue=TRAIN_QUEUE, retry=True, retry_policy={"max_retries": 2})
        return True
    except Exception:
        log.warning("could not publish training run %s; the reconciler will", run_id, exc_info=True)
        return False


def find_run(session: Session, run_id: str, organisation: str | None = None) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None or (organisation is not None and run.organisation != organisation):
        raise XrayqError("run_not_found", f"No training run {run_id!r}.")
    return run


def list_runs(session: Session, organisation: str | None = None, limit: int = 100) -> list[TrainingRun]:
    query = select(TrainingRun).order_by(TrainingRun.created_at.desc()).limit(limit)
    if organisation is not None:
        query = query.where(TrainingRun.organisation == organisation)
    return list(session.scalars(query))


def cancel_run(session: Session, run_id: str, organisation: str | None = None) -> TrainingRun:
    """A queued run is cancelled at once; a running one at the trainer's next step (within seconds)."""
    run = find_run(session, run_id, organisation)
    if run.status.terminal:
        raise XrayqError("run_not_cancellable", f"Run {run_id} is already {run.status.value}.")
    now = utcnow()
    session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == RunStatus.queued)
        .values(status=RunStatus.cancelled, cancel_requested=True, finished_at=now, progress={"phase": "cancelled"})
    )
    session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == RunStatus.running)
        .values(cancel_requested=True)
    )
    session.flush()
    session.refresh(run)
    return run


# --- the trainer's side ---------------------------------------------------------------------------


class RunNotHeld(Exception):
    """The run is no longer this trainer's: requeued after its heartbeat stopped (another trainer may hold
    it now), or finished. The trainer stops working on it and writes nothing more."""


def claim_run(session: Session, run_id: str, trainer: str) -> bool:
    """queued -> running, only once: a redelivered message finds the run taken and does nothing.

    `trainer` names this claim (unique per claim: host, pid and a random part); the trainer's later
    writes are conditional on it."""
    now = utcnow()
    claimed = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == RunStatus.queued)
        .values(
            status=RunStatus.running,
            # A resumed run keeps the start of its first claim.
            started_at=func.coalesce(TrainingRun.started_at, now),
            heartbeat_at=now,
            trainer=trainer,
            progress={"phase": "loading"},
        )
    )
    return bool(claimed.rowcount)  # type: ignore[attr-defined]


def _held(run_id: str, trainer: str | None) -> list[Any]:
    """The conditions of a write by the trainer holding the run (`trainer` None: whoever holds it)."""
    conditions: list[Any] = [TrainingRun.id == run_id, TrainingRun.status == RunStatus.running]
    if trainer is not None:
        conditions.append(TrainingRun.trainer == trainer)
    return conditions


def record_progress(
    session: Session,
    run_id: str,
    progress: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
    trainer: str | None = None,
) -> bool:
    """Write progress and the heartbeat; returns whether a cancellation was asked for.

    Raises `RunNotHeld` when `trainer` no longer holds the run."""
    values: dict[str, Any] = {"progress": progress, "heartbeat_at": utcnow()}
    if history is not None:
        values["history"] = history
    written = session.execute(update(TrainingRun).where(*_held(run_id, trainer)).values(**values))
    if trainer is not None and not written.rowcount:  # type: ignore[attr-defined]
        raise RunNotHeld(run_id)
    return bool(session.scalar(select(TrainingRun.cancel_requested).where(TrainingRun.id == run_id)))


def touch_heartbeat(session: Session, run_id: str, trainer: str) -> bool:
    """The heartbeat alone; False when `trainer` no longer holds the run."""
    touched = session.execute(update(TrainingRun).where(*_held(run_id, trainer)).values(heartbeat_at=utcnow()))
    return bool(touched.rowcount)  # type: ignore[attr-defined]


def record_checkpoint(session: Session, run_id: str, trainer: str, epoch: int) -> None:
    """The run's checkpoint now holds `epoch` (written to the object store just before)."""
    written = session.execute(
        update(TrainingRun).where(*_held(run_id, trainer)).values(checkpoint_epoch=epoch, heartbeat_at=utcnow())
    )
    if not written.rowcount:  # type: ignore[attr-defined]
        raise RunNotHeld(run_id)


def hand_back_run(session: Session, run_id: str, trainer: str) -> bool:
    """running -> queued by a stopping trainer: another trainer continues from the checkpoint.

    Not counted against the resume budget: the run did nothing wrong; its trainer was told to stop."""
    handed = session.execute(
        update(TrainingRun)
        .where(*_held(run_id, trainer))
        .values(
            status=RunStatus.queued,
            trainer=None,
            handbacks=TrainingRun.handbacks + 1,
            progress={"phase": "queued"},
        )
    )
    return bool(handed.rowcount)  # type: ignore[attr-defined]


def finish_run(session: Session, run_id: str, status: RunStatus, held_by: str | None = None, **values: Any) -> None:
    """Record the outcome of a running run (never overwriting one already finished), by the trainer
    `held_by` when given (a trainer that lost the run records nothing)."""
    session.execute(
        update(TrainingRun).where(*_held(run_id, held_by)).values(status=status, finished_at=utcnow(), **values)
    )


def recover_lost_runs(session: Session, settings: Settings) -> tuple[list[str], list[str]]:
    """Running runs whose trainer stopped writing heartbeats: queued again to resume from their
    checkpoint while `resumes` is under `run_max_resumes`, else failed with `trainer_lost`.

    Returns (requeued, failed). Each change is conditional on the run still being stale, so several
    reconcilers (one per gateway) count each loss once."""
    cutoff = utcnow() - timedelta(seconds=settings.run_stale_after_s)
    stale = session.execute(
        select(TrainingRun.id, TrainingRun.resumes).where(
            TrainingRun.status == RunStatus.running, TrainingRun.heartbeat_at < cutoff
        )
    ).all()
    requeued: list[str] = []
    failed: list[str] = []
    for run_id, resumes in stale:
        still_lost = (
            TrainingRun.id == run_id,
            TrainingRun.status == RunStatus.running,
            TrainingRun.heartbeat_at < cutoff,
        )
        if resumes < settings.run_max_resumes:
            values: dict[str, Any] = {
                "status": RunStatus.queued,
                "trainer": None,
                "resumes": TrainingRun.resumes + 1,
                "progress": {"phase": "queued"},
            }
            chosen = requeued
        else:
            values = {
                "status": RunStatus.failed,
                "finished_at": utcnow(),
                "error_code": "trainer_lost",
                "error_detail": f"The trainer stopped reporting for over {settings.run_stale_after_s:.0f} s "
                f"(killed or its machine lost), after the run had been resumed {resumes} times "
                "(XRAYQ_RUN_MAX_RESUMES); start the run again.",
                "progress": {"phase": "failed"},
            }
            chosen = failed
        if session.execute(update(TrainingRun).where(*still_lost).values(**values)).rowcount:  # type: ignore[attr-defined]
            chosen.append(run_id)
    if requeued:
        log.warning("training runs %s lost their trainer: queued again to resume from their checkpoints", requeued)
    if failed:
        log.warning("training runs %s lost their trainer once more than allowed: failed", failed)
    return requeued, failed


def queued_runs_older_than(session: Session, seconds: float) -> list[str]:
    cutoff = utcnow() - timedelta(seconds=seconds)
    return list(
        session.scalars(
            select(TrainingRun.id)
            .where(TrainingRun.status == RunStatus.queued, TrainingRun.created_at < cutoff)
            .order_by(TrainingRun.created_at)
        )
    )


def run_view(session: Session, run: TrainingRun) -> TrainingRunView:
    version = session.get(ModelVersion, run.model_version_id) if run.model_version_id else None
    evaluation = None
    if version is not None:
        evaluation = version.card.get("evaluation", {}).get("summary")
    return TrainingRunView(
        id=run.id,
        status=run.status.value,
        dataset_id=run.dataset_id,
        model_name=run.model_name,
        config=run.config,
        promotion=run.promotion,  # type: ignore[arg-type]
        progress=RunProgress(**{k: v for k, v in (run.progress or {}).items() if k in RunProgress.model_fields}),
        history=list(run.history or []),
        model=ModelRef(name=version.name, version=version.version) if version else None,
        evaluation=evaluation,
        promotion_decision=run.promotion_decision,
        error=JobError(code=run.error_code, detail=run.error_detail) if run.error_code else None,
        cancel_requested=run.cancel_requested,
        checkpoint_epoch=run.checkpoint_epoch,
        resumes=run.resumes or 0,
        handbacks=run.handbacks or 0,
        created_at=as_utc(run.created_at),
        started_at=as_utc(run.started_at),
        finished_at=as_utc(run.finished_at),
    )
