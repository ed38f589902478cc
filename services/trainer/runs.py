"""Executing a queued training run: dataset -> training -> evaluation -> registered (maybe promoted) version.

The same `fit` and evaluation as `xrayq train`; what this adds is the run's lifecycle: claim it once,
report progress and heartbeats, stop on cancellation, evaluate against the active version on the same
images, render the plots, and apply the run's promotion policy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from sqlalchemy import select

from services.trainer.data import Example, LabelledImages, detect_color_of, load_examples, train_val_split
from services.trainer.evaluation import classification_report, roc_points
from services.trainer.plots import render_plots
from services.trainer.training import TrainConfig, fit, predict_probabilities
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectStore, make_object_store
from shared.db.models import Dataset, ModelVersion, RunStatus, TrainingRun
from shared.db.session import Database, database_for
from shared.models.artifacts import load_model, register_version
from shared.models.nets import build_model, pick_device
from shared.models.registry import activate_version
from shared.training.datasets import blob_key, load_manifest
from shared.training.runs import claim_run, finish_run, record_progress

log = logging.getLogger(__name__)


class RunCancelled(Exception):
    pass


class RunReporter:
    """Turns training events into the run's progress, history and heartbeat, a few seconds apart.

    Each write also reads the cancellation flag; a requested cancellation raises `RunCancelled` out
    of the training loop.
    """

    def __init__(self, database: Database, run_id: str, interval_s: float) -> None:
        self.database = database
        self.run_id = run_id
        self.interval_s = interval_s
        self.history: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.training_started: float | None = None
        self._last_write = 0.0
        self._last_progress: dict[str, Any] = {"phase": "loading"}

    def phase(self, phase: str, **values: Any) -> None:
        self._write({"phase": phase, **values}, force=True)

    def beat(self, *_: object) -> None:
        """The heartbeat alone (progress unchanged), during long steps without progress of their own."""
        self._write(dict(self._last_progress), force=False)

    def loading(self, done: int, total: int) -> None:
        self._write({"phase": "loading", "step": done, "steps": total, "percent": 0.0}, force=done == total)

    def on_training_event(self, event: dict[str, Any]) -> None:
        if self.training_started is None:
            self.training_started = time.monotonic()
        if event["event"] == "epoch":
            self.history.append({k: v for k, v in event.items() if k not in ("event", "epochs")})
        epochs = event["epochs"]
        if event["event"] == "step":
            done = (event["epoch"] - 1 + event["step"] / event["steps"]) / epochs
        else:
            done = event["epoch"] / epochs
        elapsed = time.monotonic() - self.training_started
        progress = {
            "phase": "training",
            "epoch": event["epoch"],
            "epochs": epochs,
            "step": event.get("step"),
            "steps": event.get("steps"),
            "percent": round(100 * done, 1),
            "eta_seconds": round(elapsed / done * (1 - done), 1) if done > 0 else None,
        }
        self._write(progress, force=event["event"] == "epoch")

    def _write(self, progress: dict[str, Any], force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < self.interval_s:
            return
        self._last_write = now
        self._last_progress = progress
        progress["elapsed_seconds"] = round(now - self.started, 1)
        with self.database.session() as session:
            cancel = record_progress(session, self.run_id, progress, list(self.history))
        if cancel:
            raise RunCancelled


def execute_run(settings: Settings, run_id: str) -> dict[str, Any] | None:
    """Claim and run `run_id`; a run already claimed (a redelivered message) is left alone."""
    database = database_for(settings)
    with database.session() as session:
        if not claim_run(session, run_id, f"{platform.node()}:{os.getpid()}"):
            log.info("training run %s is not queued (taken, finished or cancelled): nothing to do", run_id)
            return None
    reporter = RunReporter(database, run_id, settings.run_heartbeat_s)
    outcome: dict[str, Any] | None = None
    try:
        outcome = _train_evaluate_register(settings, database, make_object_store(settings), run_id, reporter)
    except RunCancelled:
        log.info("training run %s cancelled", run_id)
        with database.session() as session:
            finish_run(session, run_id, RunStatus.cancelled, progress={"phase": "cancelled"})
    except XrayqError as error:
        log.warning("training run %s failed: %s", run_id, error)
        with database.session() as session:
            finish_run(
                session, run_id, RunStatus.failed, error_code=error.code, error_detail=error.detail,
                progress={"phase": "failed"},
            )  # fmt: skip
    except Exception as error:
        log.exception("training run %s failed", run_id)
        with database.session() as session:
            finish_run(
                session, run_id, RunStatus.failed, error_code="training_failed",
                error_detail=f"{type(error).__name__}: {error}"[:2000], progress={"phase": "failed"},
            )  # fmt: skip
    finally:
        if torch.cuda.is_initialized():
            # The trainer waits for the next run holding nothing: the caching allocator would keep
            # the run's GPU memory (2.5 GiB for the chest recipe on an H100) from other processes.
            torch.cuda.empty_cache()
    return outcome


@dataclass
class EvaluationSet:
    name: str  # "test", or "val" when the dataset has no test split
    examples: list[Example]
    images: LabelledImages


def _train_evaluate_register(
    settings: Settings, database: Database, store: ObjectStore, run_id: str, reporter: RunReporter
) -> dict[str, Any]:
    with database.session() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None
        dataset = session.get(Dataset, run.dataset_id)
        assert dataset is not None
        base = session.get(ModelVersion, run.base_model_version_id) if run.base_model_version_id else None
        base_weights = _base_weights(store, base) if base is not None else None
        name, policy, run_config, dataset_id = run.model_name, run.promotion, dict(run.config), dataset.id
        manifest = load_manifest(store, dataset)
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(
        **{k: v for k, v in run_config.items() if k in known},
        device=settings.device,
        torch_threads=settings.torch_threads,
    )
    classes: list[str] = manifest["classes"]
    by_split = _examples_by_split(store, manifest, classes)
    train_examples = _cap_per_class(by_split.get("train", []), config.max_per_class)
    if config.color == "auto":
        config.color = detect_color_of([e.read for e in train_examples])
    spec = config.spec()
    train = load_examples(train_examples, classes, spec, progress=reporter.loading)
    if by_split.get("val"):
        val_examples = by_split["val"]
        val = load_examples(val_examples, classes, spec, progress=reporter.beat)
        split_note: dict[str, Any] = {"method": "the dataset's val split"}
    else:
        train_idx, val_idx = train_val_split(train, config.val_fraction, config.seed)
        held_out = set(val_idx.tolist())
        val_examples = [e for i, e in enumerate(_kept(train_examples, train)) if i in held_out]
        train, val = train.subset(train_idx), train.subset(val_idx)
        split_note = {
            "method": "carved from train: stratified by class, grouped by patient, hashed with the seed",
            "seed": config.seed,
            "val_fraction": config.val_fraction,
        }
    evaluation = (
        EvaluationSet("test", by_split["test"], load_examples(by_split["test"], classes, spec, progress=reporter.beat))
        if by_split.get("test")
        else EvaluationSet("val", val_examples, val)
    )
    reporter.phase("training", percent=0.0)
    result = fit(train, val, config, reporter.on_training_event, initial_state=base_weights)

    reporter.phase("evaluating", percent=100.0)
    device = pick_device(config.device)
    model = build_model(config.architecture, len(classes))
    model.load_state_dict(result.state_dict)
    model.to(device)
    probabilities = predict_probabilities(model, evaluation.images, spec, device)
    labels = evaluation.images.labels.numpy()
    report = classification_report(labels, probabilities, classes)
    champion = _evaluate_champion(settings, database, store, name, classes, evaluation, reporter)
    decision = decide_promotion(policy, report, champion)
    plots = render_plots(
        report,
        roc_points(labels, probabilities, classes),
        reporter.history,
        f"{name} (run {run_id[:8]}), {evaluation.name} split",
    )

    reporter.phase("registering", percent=100.0)
    summary = evaluation_summary(report, evaluation.name)
    with database.session() as session:
        row = register_version(
            session,
            store,
            name=name,
            architecture=config.architecture,
            classes=classes,
            preprocessing=spec,
            state_dict=result.state_dict,
            metrics={"validation": result.report, "history": reporter.history, "evaluation": report},
            data={
                "dataset": {"id": dataset_id, "name": manifest["name"], "version": manifest["version"]},
                "classes": classes,
                "counts": {"train": len(train), "val": len(val), evaluation.name: len(evaluation.images)},
                "split": split_note,
            },
            training={
                "config": config.to_dict(),
                "seconds": round(result.seconds, 1),
                "device": str(device),
                "torch": torch.__version__,
                "host": platform.node(),
                "base_model": {"name": base.name, "version": base.version} if base is not None else None,
            },
            activate="never",
            intended_use=run_config.get("intended_use"),
            provenance={
                "dataset_id": dataset_id,
                "training_run_id": run_id,
                "evaluation": {"split": evaluation.name, "summary": summary, "champion": champion},
            },
            files={plot: (content, "image/png") for plot, content in plots.items()},
        )
        if decision["promote"]:
            activate_version(session, row, reason=f"policy:{policy}", actor=f"training-run:{run_id}")
        decision["version"] = row.version
        finish_run(
            session,
            run_id,
            RunStatus.succeeded,
            model_version_id=row.id,
            promotion_decision=decision,
            history=reporter.history,
            progress={
                "phase": "done",
                "percent": 100.0,
                "elapsed_seconds": round(time.monotonic() - reporter.started, 1),
            },
        )
        outcome = {"name": row.name, "version": row.version, "active": row.is_active, "evaluation": summary}
    log.info("training run %s registered %s@%s: %s", run_id, outcome["name"], outcome["version"], summary)
    return outcome


def evaluation_summary(report: dict[str, Any], split: str) -> dict[str, Any]:
    keys = ("n", "accuracy", "roc_auc", "sensitivity", "specificity", "positive_class", "threshold")
    summary = {key: report.get(key) for key in keys if key in report}
    summary["ece"] = report["calibration"]["ece"]
    summary["split"] = split
    return summary


def decide_promotion(policy: str, candidate: dict[str, Any], champion: dict[str, Any] | None) -> dict[str, Any]:
    """manual: never; always: yes; if_better: when it beats the active version on the same images.

    Compared on ROC-AUC where both have one (threshold-free), else accuracy; a tie keeps the active one.
    """
    if policy == "always":
        return {"policy": policy, "promote": True, "reason": "policy is always"}
    if policy == "manual":
        return {"policy": policy, "promote": False, "reason": "manual: promote it through the API"}
    if champion is None:
        return {"policy": policy, "promote": True, "reason": "no active version to compare with"}
    if "error" in champion:
        return {"policy": policy, "promote": False, "reason": f"not comparable: {champion['error']}"}
    metric = "roc_auc" if candidate.get("roc_auc") is not None and champion.get("roc_auc") is not None else "accuracy"
    better = candidate[metric] > champion[metric]
    return {
        "policy": policy,
        "promote": bool(better),
        "metric": metric,
        "candidate": candidate[metric],
        "active": champion[metric],
        "active_version": champion["version"],
        "reason": f"{metric} {candidate[metric]:.4f} {'>' if better else '<='} active "
        f"v{champion['version']}'s {champion[metric]:.4f} on the same {candidate['n']} images",
    }


def _evaluate_champion(
    settings: Settings,
    database: Database,
    store: ObjectStore,
    name: str,
    classes: list[str],
    evaluation: EvaluationSet,
    reporter: RunReporter,
) -> dict[str, Any] | None:
    """The active version's figures on this run's evaluation images, through its own preprocessing."""
    with database.session() as session:
        active = session.scalars(
            select(ModelVersion).where(ModelVersion.name == name, ModelVersion.is_active.is_(True))
        ).first()
        if active is None:
            return None
        if list(active.classes) != classes:
            return {"version": active.version, "error": f"its classes {active.classes} differ from {classes}"}
        device = pick_device(settings.device)
        loaded = load_model(active, store, device)
    images = load_examples(evaluation.examples, classes, loaded.spec, progress=reporter.beat)
    probabilities = predict_probabilities(loaded.module, images, loaded.spec, device)
    report = classification_report(images.labels.numpy(), probabilities, classes)
    return {"version": active.version, **evaluation_summary(report, evaluation.name)}


def _examples_by_split(store: ObjectStore, manifest: dict[str, Any], classes: list[str]) -> dict[str, list[Example]]:
    index = {label: i for i, label in enumerate(classes)}
    by_split: dict[str, list[Example]] = {}
    for entry in manifest["files"]:
        example = Example(entry["path"], index[entry["label"]], partial(store.get, blob_key(entry["sha256"])))
        by_split.setdefault(entry["split"], []).append(example)
    return by_split


def _cap_per_class(examples: list[Example], cap: int | None) -> list[Example]:
    if cap is None:
        return examples
    taken: dict[int, int] = {}
    kept = []
    for example in examples:
        if taken.get(example.label, 0) < cap:
            taken[example.label] = taken.get(example.label, 0) + 1
            kept.append(example)
    return kept


def _kept(examples: list[Example], loaded: LabelledImages) -> list[Example]:
    """The examples that decoded (unreadable ones were left out), in `loaded`'s order."""
    names = set(loaded.names)
    return [e for e in examples if e.name in names]


def _base_weights(store: ObjectStore, base: ModelVersion) -> dict[str, torch.Tensor]:
    weights = store.get(base.weights_key)
    if hashlib.sha256(weights).hexdigest() != base.weights_sha256:
        raise XrayqError("model_corrupt", f"Weights of {base.name}@{base.version} do not match their sha256.")
    return load_safetensors(weights)
