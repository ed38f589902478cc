"""Registry rows as the API shows them: a model name with its versions, a version's card, an activation.

Provenance (dataset names and ids, training run ids, hosts, base models, who activated what) is shown
to the model's owner and to admins only; every other key that may use the model still sees what it
needs to choose one: architecture, classes, metrics, preprocessing, intended use, plots.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import ModelActivation, ModelVersion, RegisteredModel, as_utc
from shared.models.calibration import calibration_status, uncertainty_status
from shared.models.ood import checks_of
from shared.models.ownership import may_manage, may_use
from shared.schemas import ModelActivationView, ModelVersionView, ModelView

# What of a card every user of the model may read (an allow-list: new provenance stays private).
PUBLIC_CARD_KEYS = (
    *("name", "version", "architecture", "classes", "preprocessing", "metrics", "intended_use"),
    *("files", "weights", "created_at", "calibration", "uncertainty", "ood", "explain"),
)
PUBLIC_DATA_KEYS = ("classes", "counts", "split")
PUBLIC_TRAINING_KEYS = ("config", "seconds", "device", "torch")
PUBLIC_EVALUATION_KEYS = ("split", "summary", "champion")


def public_card(card: dict[str, Any]) -> dict[str, Any]:
    """The card as a key that does not own the model sees it: no datasets, runs, hosts or base models."""

    def pick(part: Any, keys: tuple[str, ...]) -> dict[str, Any]:
        return {key: part[key] for key in keys if key in part} if isinstance(part, dict) else {}

    public = pick(card, PUBLIC_CARD_KEYS)
    public["data"] = pick(card.get("data"), PUBLIC_DATA_KEYS)
    public["training"] = pick(card.get("training"), PUBLIC_TRAINING_KEYS)
    if card.get("evaluation") is not None:
        public["evaluation"] = pick(card["evaluation"], PUBLIC_EVALUATION_KEYS)
    return public


def version_view(row: ModelVersion, *, provenance: bool = True) -> ModelVersionView:
    """`provenance`: whether the reader owns the model (or is an admin); else the public card only."""
    base = f"/v1/models/{row.name}/versions/{row.version}/files"
    card = row.card if provenance else public_card(row.card)
    return ModelVersionView(
        name=row.name,
        version=row.version,
        architecture=row.architecture,
        classes=list(row.classes),
        is_active=row.is_active,
        created_at=as_utc(row.created_at),
        activated_at=as_utc(row.activated_at),
        metrics=row.metrics,
        preprocessing=row.card.get("preprocessing", {}),
        weights_sha256=row.weights_sha256,
        dataset_id=row.dataset_id if provenance else None,
        training_run_id=row.training_run_id if provenance else None,
        evaluation=card.get("evaluation"),
        plots={name.removesuffix(".png"): f"{base}/{name}" for name in row.card.get("files", {})},
        card=card,
        calibration=calibration_status(row.card),
        uncertainty=uncertainty_status(row.card),
        checks=checks_of(row.card),
    )


def activation_view(row: ModelActivation, *, provenance: bool = True) -> ModelActivationView:
    return ModelActivationView(
        name=row.name,
        version=row.version,
        previous_version=row.previous_version,
        reason=row.reason,
        actor=row.actor if provenance else None,
        actor_key_id=row.actor_key_id if provenance else None,
        actor_organisation=row.actor_organisation if provenance else None,
        created_at=as_utc(row.created_at),
    )


def model_views(session: Session, scope: str | None) -> list[ModelView]:
    """Every model name `scope` may use, newest version first, with the version that answers it."""
    by_name: dict[str, list[ModelVersion]] = defaultdict(list)
    for row in session.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version.desc())):
        by_name[row.name].append(row)
    models = {model.name: model for model in session.scalars(select(RegisteredModel))}
    views = []
    for name, rows in by_name.items():
        model = models.get(name)
        owner = model.owner if model is not None else None
        if not may_use(owner, scope):
            continue
        provenance = may_manage(owner, scope)
        views.append(
            ModelView(
                name=name,
                active_version=next((r.version for r in rows if r.is_active), None),
                classes=list(rows[0].classes),
                owner=owner,
                evaluation_set=model.evaluation_set if model is not None and provenance else None,
                versions=[version_view(r, provenance=provenance) for r in rows],
            )
        )
    return views
