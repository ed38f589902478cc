"""Executing a training run: dataset -> training -> evaluation -> registered (maybe promoted) version.

Every training takes this path: queued runs (POST /v1/training-runs) through the trainer, and the
starter model and `xrayq train DATA` in-process (`services.trainer.pipeline`). Around the named steps
below it keeps the run's lifecycle: claim it once, report progress and heartbeats, stop on
cancellation, and record how it ended.

The steps: `load_run` (what the row asks for), `load_data` (the dataset's images as model pixels),
`fit`, `evaluate` (on the test split, or the validation split when there is none), `assess_robustness`
(the same images under scanner-like corruptions, `services.trainer.robustness`), `compare_with_active`
(the active version on the model's held-out set, `services.trainer.comparison`), `register`, `promote`
(the run's policy). Only the model's owner or an admin may register into it: checked when the run is
queued, when it starts and when it registers (`shared.models.ownership`).

Each epoch ends with a checkpoint (`services.trainer.checkpoints`); a run that comes back to a trainer
(its trainer lost, or stopping and handing it back: `services.trainer.handback`) continues after the
checkpoint's epoch. The checkpoint is deleted once the run has ended.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from sqlalchemy.orm import Session

from services.trainer.calibration import calibrate, calibrated_evaluation
from services.trainer.checkpoints import RunCheckpoints, recipe_fingerprint
from services.trainer.comparison import (
    choose_held_out,
    compare_with_active,
    decide_promotion,
    evaluation_summary,
    score_candidate,
    trained_model,
)
from services.trainer.data import (
    Example,
    LabelledImages,
    cap_per_class,
    decoded,
    detect_color_of,
    load_examples,
    train_val_split,
)
from services.trainer.evaluation import classification_report, roc_points
from services.trainer.handback import RunHandedBack
from services.trainer.held_out import record_model_set
from services.trainer.ood_reference import ReferenceArtifacts, build_reference
from services.trainer.plots import render_plots, robustness_plot
from services.trainer.reporter import RunCancelled, RunReporter
from services.trainer.robustness import robustness_report
from services.trainer.training import ProgressCallback, TrainConfig, TrainResult, fit
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectStore, make_object_store
from shared.db.models import Dataset, ModelVersion, RunStatus, TrainingRun
from shared.db.session import Database, database_for
from shared.models.artifacts import register_version
from shared.models.nets import build_model, pick_device
from shared.models.ownership import Actor, check_may_manage
from shared.models.registry import activate_version
from shared.training.checkpoints import discard_checkpoint
from shared.training.datasets import blob_key, load_manifest
from shared.training.runs import RunNotHeld, claim_run, class_balance_of, finish_run, hand_back_run

log = logging.getLogger(__name__)


def execute_run(
    settings: Settings,
    run_id: str,
    listener: ProgressCallback | None = None,
    requeue: Callable[[str], object] | None = None,
) -> dict[str, Any] | None:
    """Claim and run `run_id`; a run already claimed (a redelivered message) is left alone.

    How a run ends is recorded on its row (a failure as its error code), never raised. A run handed
    back (the trainer is stopping) is queued again and given to `requeue` (publishes it).
    """
    database = database_for(settings)
    trainer = f"{platform.node()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this claim, unique
    with database.session() as session:
        if not claim_run(session, run_id, trainer):
            log.info("training run %s is not queued (taken, finished or cancelled): nothing to do", run_id)
            return None
    store = make_object_store(settings)
    reporter = RunReporter(database, run_id, settings.run_heartbeat_s, listener, trainer=trainer)
    reporter.keep_alive()
    outcome: dict[str, Any] | None = None
    try:
        outcome = _run_steps(settings, database, store, run_id, reporter)
    except RunHandedBack:
        _hand_back(database, run_id, trainer, requeue)
        return None
    except RunNotHeld:
        log.warning("training run %s was taken from this trainer (its heartbeat was late): left alone", run_id)
        return None
    except RunCancelled:
        log.info("training run %s cancelled", run_id)
        with database.session() as session:
            finish_run(session, run_id, RunStatus.cancelled, held_by=trainer, progress={"phase": "cancelled"})
    except XrayqError as error:
        log.warning("training run %s failed: %s", run_id, error)
        with database.session() as session:
            finish_run(
                session, run_id, RunStatus.failed, held_by=trainer, error_code=error.code,
                error_detail=error.detail, progress={"phase": "failed"},
            )  # fmt: skip
    except Exception as error:
        log.exception("training run %s failed", run_id)
        with database.session() as session:
            finish_run(
                session, run_id, RunStatus.failed, held_by=trainer, error_code="training_failed",
                error_detail=f"{type(error).__name__}: {error}"[:2000], progress={"phase": "failed"},
            )  # fmt: skip
    finally:
        reporter.close()
        if torch.cuda.is_initialized():
            # The trainer waits for the next run holding nothing: the caching allocator would keep
            # the run's GPU memory (2.5 GiB for the chest recipe on an H100) from other processes.
            torch.cuda.empty_cache()
    discard_checkpoint(store, run_id)  # the run has ended: nothing will continue it
    return outcome


def _hand_back(database: Database, run_id: str, trainer: str, requeue: Callable[[str], object] | None) -> None:
    with database.session() as session:
        handed = hand_back_run(session, run_id, trainer)
    if not handed:
        return
    log.info("training run %s handed back (the trainer is stopping): it resumes from its checkpoint", run_id)
    if requeue is not None:
        requeue(run_id)  # a failed publish leaves it queued: the reconciler publishes it


def _run_steps(
    settings: Settings, database: Database, store: ObjectStore, run_id: str, reporter: RunReporter
) -> dict[str, Any]:
    run = load_run(settings, database, store, run_id)
    assert reporter.trainer is not None
    fingerprint = recipe_fingerprint(run.config.to_dict(), run.manifest["classes"])
    checkpoints = RunCheckpoints(database, store, run_id, reporter.trainer, fingerprint)
    resume = checkpoints.load(run.checkpoint_epoch)
    if resume is not None:
        reporter.resumed(resume.epoch, run.config.epochs, resume.history)
    data = load_data(store, run, reporter)
    reporter.phase("training", percent=reporter.resumed_percent)
    result = fit(
        data.train, data.val, run.config, reporter.on_training_event, initial_state=run.base_weights,
        resume=resume, checkpoint=checkpoints.save,
    )  # fmt: skip
    reporter.phase("evaluating", percent=100.0)
    calibrated = calibrate_on_validation(run, data, result)
    evaluation = evaluate(run, data, result, reporter.history, calibrated)
    assess_robustness(run, data, result, evaluation, reporter)
    reference = fit_ood_reference(store, run, data, result, reporter)
    held_out, recorded, rescore = choose_held_out(database, store, run, data)
    champion = compare_with_active(settings, database, store, run, held_out, reporter)
    candidate = score_candidate(run, data, result, held_out, reporter) if rescore else evaluation.report
    decision = decide_promotion(run.policy, candidate, champion)
    decision["evaluated_on"] = {**held_out.describe(), "model_held_out_set": recorded}
    reporter.phase("registering", percent=100.0)
    with database.session() as session:
        row = register(
            session, store, run, data, result, evaluation, champion, decision, reporter.history, calibrated, reference
        )
        record_model_set(session, store, run.name, held_out)
        promote(session, row, run, decision)
        finish_run(
            session,
            run_id,
            RunStatus.succeeded,
            held_by=reporter.trainer,
            model_version_id=row.id,
            promotion_decision=decision,
            history=reporter.history,
            progress={
                "phase": "done",
                "percent": 100.0,
                "elapsed_seconds": round(time.monotonic() - reporter.started, 1),
            },
        )
        outcome = {
            "name": row.name,
            "version": row.version,
            "active": row.is_active,
            "classes": list(row.classes),
            "evaluation": evaluation.summary,
            "validation": result.report,
            "train_seconds": round(result.seconds, 1),
        }
    log.info("training run %s registered %s@%s: %s", run_id, row.name, outcome["version"], evaluation.summary)
    return outcome


# --- load ----------------------------------------------------------------------------------------


@dataclass
class RunInputs:
    """What a run's row asks for, read once at the start."""

    run_id: str
    name: str
    policy: str
    config: TrainConfig
    intended_use: dict[str, list[str]] | None
    dataset: dict[str, Any]  # id, name, version
    manifest: dict[str, Any]
    base: dict[str, Any] | None  # name, version of the version fine-tuned from
    base_weights: dict[str, torch.Tensor] | None
    # Who asked: whose models it may register into (None: an admin's run), the key and its organisation.
    model_scope: str | None = None
    api_key_id: str | None = None
    organisation: str | None = None
    checkpoint_epoch: int | None = None  # the epoch of its checkpoint: a resumed run continues after it


def load_run(settings: Settings, database: Database, store: ObjectStore, run_id: str) -> RunInputs:
    with database.session() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None
        # Checked when the run was queued; checked again before an hour of training goes into it
        # (the name may have been registered by another organisation since), and at registration.
        check_may_manage(session, run.model_name, run.model_scope)
        dataset = session.get(Dataset, run.dataset_id)
        assert dataset is not None
        base = session.get(ModelVersion, run.base_model_version_id) if run.base_model_version_id else None
        base_weights = _base_weights(store, base) if base is not None else None
        manifest = load_manifest(store, dataset)
        name, policy, run_config = run.model_name, run.promotion, dict(run.config)
        requester = {"model_scope": run.model_scope, "api_key_id": run.api_key_id, "organisation": run.organisation}
        checkpoint_epoch = run.checkpoint_epoch
    # Runs queued before these options existed: their class_weighting, and the normalisation of then.
    run_config["class_balance"] = class_balance_of(run_config)
    run_config.setdefault("normalization", "fixed")
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(
        **{k: v for k, v in run_config.items() if k in known},
        device=settings.device,
        torch_threads=settings.torch_threads,
    )
    return RunInputs(
        run_id=run_id,
        name=name,
        policy=policy,
        config=config,
        intended_use=run_config.get("intended_use"),
        dataset={"id": manifest["id"], "name": manifest["name"], "version": manifest["version"]},
        manifest=manifest,
        base={"name": base.name, "version": base.version} if base is not None else None,
        base_weights=base_weights,
        checkpoint_epoch=checkpoint_epoch,
        **requester,
    )


@dataclass
class EvaluationSet:
    name: str  # "test", or "val" when the dataset has no test split
    examples: list[Example]
    images: LabelledImages


@dataclass
class RunData:
    classes: list[str]
    train: LabelledImages
    val: LabelledImages
    evaluation: EvaluationSet
    split: dict[str, Any]  # how the validation split was made


def load_data(store: ObjectStore, run: RunInputs, reporter: RunReporter) -> RunData:
    """The dataset's images as model pixels; the validation split carved from train when it has none.

    Sets the config's colour from the data when it says "auto".
    """
    config = run.config
    classes: list[str] = run.manifest["classes"]
    by_split = examples_by_split(store, run.manifest, classes)
    train_examples = cap_per_class(by_split.get("train", []), config.max_per_class)
    if config.color == "auto":
        config.color = detect_color_of([e.read for e in train_examples])
    spec = config.spec()
    train = load_examples(train_examples, classes, spec, progress=reporter.loading)
    if by_split.get("val"):
        val_examples = by_split["val"]
        val = load_examples(val_examples, classes, spec, progress=reporter.beat)
        split: dict[str, Any] = {"method": "the dataset's val split"}
    else:
        train_idx, val_idx = train_val_split(train, config.val_fraction, config.seed)
        held_out = set(val_idx.tolist())
        val_examples = [e for i, e in enumerate(decoded(train_examples, train)) if i in held_out]
        train, val = train.subset(train_idx), train.subset(val_idx)
        split = {
            "method": "carved from train: stratified by class, grouped by patient, hashed with the seed",
            "seed": config.seed,
            "val_fraction": config.val_fraction,
        }
    split.update(train=len(train), val=len(val))
    if by_split.get("test"):
        test = load_examples(by_split["test"], classes, spec, progress=reporter.beat)
        evaluation = EvaluationSet("test", by_split["test"], test)
    else:
        evaluation = EvaluationSet("val", val_examples, val)
    counts = {c: a + b for (c, a), b in zip(train.class_counts().items(), val.class_counts().values(), strict=True)}
    reporter.data_loaded(len(train), len(val), classes, counts)
    return RunData(classes, train, val, evaluation, split)


def examples_by_split(store: ObjectStore, manifest: dict[str, Any], classes: list[str]) -> dict[str, list[Example]]:
    index = {label: i for i, label in enumerate(classes)}
    by_split: dict[str, list[Example]] = {}
    for entry in manifest["files"]:
        example = Example(entry["path"], index[entry["label"]], partial(store.get, blob_key(entry["sha256"])))
        by_split.setdefault(entry["split"], []).append(example)
    return by_split


def _base_weights(store: ObjectStore, base: ModelVersion) -> dict[str, torch.Tensor]:
    weights = store.get(base.weights_key)
    if hashlib.sha256(weights).hexdigest() != base.weights_sha256:
        raise XrayqError("model_corrupt", f"Weights of {base.name}@{base.version} do not match their sha256.")
    return load_safetensors(weights)


# --- evaluate and compare ------------------------------------------------------------------------


@dataclass
class Evaluation:
    report: dict[str, Any]
    summary: dict[str, Any]
    plots: dict[str, bytes]


def calibrate_on_validation(run: RunInputs, data: RunData, result: TrainResult) -> dict[str, Any]:
    """The card's `calibration` (temperature) and `uncertainty` (flag threshold), fitted on validation."""
    device = pick_device(run.config.device)
    return calibrate(trained_model(run, data.classes, result, device), data.val, run.config.spec(), device)


def evaluate(
    run: RunInputs, data: RunData, result: TrainResult, history: list[dict[str, Any]], calibrated: dict[str, Any]
) -> Evaluation:
    """The trained model's report and plots on the evaluation images, its probabilities calibrated as
    the version will serve them (`calibrated`: the card's calibration sections)."""
    spec = run.config.spec()
    device = pick_device(run.config.device)
    model = trained_model(run, data.classes, result, device)
    images = data.evaluation.images
    probabilities, calibration, flags = calibrated_evaluation(model, images, spec, device, calibrated)
    labels = images.labels.numpy()
    report = classification_report(labels, probabilities, data.classes)
    report["calibration"] = calibration  # before and after, on the evaluation images
    report["uncertainty"] = flags
    plots = render_plots(
        report,
        roc_points(labels, probabilities, data.classes),
        history,
        f"{run.name} (run {run.run_id[:8]}), {data.evaluation.name} split",
    )
    return Evaluation(report, evaluation_summary(report, data.evaluation.name), plots)


def assess_robustness(
    run: RunInputs, data: RunData, result: TrainResult, evaluation: Evaluation, reporter: RunReporter
) -> None:
    """The evaluation images under every corruption: into the report (`robustness`), its summary
    (`shift_proxy`) and a plot."""
    spec = run.config.spec()
    device = pick_device(run.config.device)
    model = trained_model(run, data.classes, result, device)
    images, split = data.evaluation.images, data.evaluation.name
    robustness = robustness_report(model, images, spec, device, split, progress=reporter.beat)
    evaluation.report["robustness"] = robustness
    evaluation.summary["shift_proxy"] = robustness["proxy"]
    evaluation.plots["robustness.png"] = robustness_plot(
        robustness, f"{run.name} (run {run.run_id[:8]}), {data.evaluation.name} split"
    )


# --- register and promote ------------------------------------------------------------------------


def register(
    session: Session,
    store: ObjectStore,
    run: RunInputs,
    data: RunData,
    result: TrainResult,
    evaluation: Evaluation,
    champion: dict[str, Any] | None,
    decision: dict[str, Any],
    history: list[dict[str, Any]],
    calibrated: dict[str, Any],
    reference: ReferenceArtifacts,
) -> ModelVersion:
    """The new version (inactive) with its card, evaluation report and plots; its calibration and
    uncertainty sections (`calibrated`) and its out-of-distribution reference."""
    config = run.config
    return register_version(
        session,
        store,
        name=run.name,
        scope=run.model_scope,
        architecture=config.architecture,
        classes=data.classes,
        preprocessing=config.spec(),
        state_dict=result.state_dict,
        metrics={"validation": result.report, "history": history, "evaluation": evaluation.report},
        data={
            "dataset": run.dataset,
            "classes": data.classes,
            "counts": {
                "train": len(data.train),
                "val": len(data.val),
                data.evaluation.name: len(data.evaluation.images),
            },
            "split": data.split,
        },
        training={
            "config": config.to_dict(),
            "seconds": round(result.seconds, 1),
            "device": str(pick_device(config.device)),
            "torch": torch.__version__,
            "host": platform.node(),
            "base_model": run.base,
        },
        activate="never",
        intended_use=run.intended_use,
        provenance={
            "dataset_id": run.dataset["id"],
            "training_run_id": run.run_id,
            "evaluation": {
                "split": evaluation.summary["split"],
                "summary": evaluation.summary,
                "champion": champion,
                "compared_on": decision["evaluated_on"],
            },
        },
        files={plot: (content, "image/png") for plot, content in evaluation.plots.items()},
        extra_card={**calibrated, **reference.extra_card()},
        attachments=reference.attachments(),
    )


def fit_ood_reference(
    store: ObjectStore, run: RunInputs, data: RunData, result: TrainResult, reporter: RunReporter
) -> ReferenceArtifacts:
    """The trained model's out-of-distribution reference (`services.trainer.ood_reference`)."""
    device = pick_device(run.config.device)
    module = build_model(run.config.architecture, len(data.classes))
    module.load_state_dict(result.state_dict)
    train_reads = [example.read for example in examples_by_split(store, run.manifest, data.classes).get("train", [])]
    return build_reference(module, run.config.spec(), data.train, data.val, train_reads, device, beat=reporter.beat)


def promote(session: Session, row: ModelVersion, run: RunInputs, decision: dict[str, Any]) -> None:
    """Apply the policy's decision; the decision records the version it was about."""
    if decision["promote"]:
        actor = Actor(
            scope=run.model_scope,
            organisation=run.organisation,
            key_id=run.api_key_id,
            label=f"training-run:{run.run_id}",
        )
        activate_version(session, row, reason=f"policy:{run.policy}", actor=actor)
    decision["version"] = row.version
