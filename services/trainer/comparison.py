"""Comparing a run's candidate with the active version, and the promotion policy's decision.

Both are scored on the model's held-out set (`services.trainer.held_out`), each through its own
preprocessing, so the figures a decision quotes are of the same images whoever submitted the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from services.trainer.data import load_examples
from services.trainer.evaluation import classification_report
from services.trainer.held_out import HeldOutSet, load_model_set, runs_own_set
from services.trainer.reporter import RunReporter
from services.trainer.training import TrainResult, predict_probabilities
from shared.core.settings import Settings
from shared.core.storage import ObjectStore
from shared.db.models import ModelVersion
from shared.db.session import Database
from shared.models.artifacts import load_model
from shared.models.nets import build_model, pick_device

if TYPE_CHECKING:
    import torch

    from services.trainer.runs import RunData, RunInputs


def evaluation_summary(report: dict[str, Any], split: str) -> dict[str, Any]:
    keys = ("n", "accuracy", "roc_auc", "sensitivity", "specificity", "positive_class", "threshold")
    summary = {key: report.get(key) for key in keys if key in report}
    summary["ece"] = report["calibration"]["ece"]
    summary["split"] = split
    return summary


def choose_held_out(
    database: Database, store: ObjectStore, run: RunInputs, data: RunData
) -> tuple[HeldOutSet, bool, bool]:
    """The images to compare on; whether they are the set the model recorded; whether the candidate
    must be scored on them again (they are not the run's own evaluation images).

    A model without a recorded set (a new name, or one from before sets existed) is compared on the
    run's evaluation images, which then become its set.
    """
    evaluation = data.evaluation
    own = runs_own_set(store, run.manifest, evaluation.name, data.classes, evaluation.examples)
    with database.session() as session:
        models = load_model_set(session, store, run.name)
    if models is None:
        return own, False, False
    return models, True, not models.same_images(own)


def trained_model(run: RunInputs, classes: list[str], result: TrainResult, device: torch.device) -> torch.nn.Module:
    model = build_model(run.config.architecture, len(classes))
    model.load_state_dict(result.state_dict)
    return model.to(device)


def score_candidate(
    run: RunInputs, data: RunData, result: TrainResult, held_out: HeldOutSet, reporter: RunReporter
) -> dict[str, Any]:
    """The trained candidate's report on `held_out`, through the run's preprocessing."""
    if held_out.classes != data.classes:
        return {"error": f"the model's held-out set has classes {held_out.classes}, this run {data.classes}"}
    spec = run.config.spec()
    device = pick_device(run.config.device)
    model = trained_model(run, data.classes, result, device)
    images = load_examples(held_out.examples, held_out.classes, spec, progress=reporter.beat)
    probabilities = predict_probabilities(model, images, spec, device)
    return classification_report(images.labels.numpy(), probabilities, held_out.classes)


def compare_with_active(
    settings: Settings,
    database: Database,
    store: ObjectStore,
    run: RunInputs,
    held_out: HeldOutSet,
    reporter: RunReporter,
) -> dict[str, Any] | None:
    """The active version's figures on the held-out images, through its own preprocessing."""
    classes = held_out.classes
    with database.session() as session:
        active = session.scalars(
            select(ModelVersion).where(ModelVersion.name == run.name, ModelVersion.is_active.is_(True))
        ).first()
        if active is None:
            return None
        if list(active.classes) != classes:
            return {"version": active.version, "error": f"its classes {active.classes} differ from {classes}"}
        device = pick_device(settings.device)
        loaded = load_model(active, store, device)
    images = load_examples(held_out.examples, classes, loaded.spec, progress=reporter.beat)
    probabilities = predict_probabilities(loaded.module, images, loaded.spec, device)
    report = classification_report(images.labels.numpy(), probabilities, classes)
    return {"version": active.version, **evaluation_summary(report, held_out.split)}


def decide_promotion(policy: str, candidate: dict[str, Any], champion: dict[str, Any] | None) -> dict[str, Any]:
    """manual: never; always: yes; if_none_active: when no version is active; if_better: when it beats
    the active version on the same images.

    Compared on ROC-AUC where both have one (threshold-free), else accuracy; a tie keeps the active one.
    """
    if policy == "always":
        return {"policy": policy, "promote": True, "reason": "policy is always"}
    if policy == "manual":
        return {"policy": policy, "promote": False, "reason": "manual: promote it through the API"}
    if champion is None:
        return {"policy": policy, "promote": True, "reason": "no active version to compare with"}
    if policy == "if_none_active":
        return {"policy": policy, "promote": False, "reason": f"v{champion['version']} is active"}
    for figures in (champion, candidate):
        if "error" in figures:
            return {"policy": policy, "promote": False, "reason": f"not comparable: {figures['error']}"}
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
