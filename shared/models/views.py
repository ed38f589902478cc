"""Registry rows as the API shows them: a model name with its versions, a version's card, an activation."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import ModelActivation, ModelVersion, as_utc
from shared.schemas import ModelActivationView, ModelVersionView, ModelView


def version_view(row: ModelVersion) -> ModelVersionView:
    base = f"/v1/models/{row.name}/versions/{row.version}/files"
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
        dataset_id=row.dataset_id,
        training_run_id=row.training_run_id,
        evaluation=row.card.get("evaluation"),
        plots={name.removesuffix(".png"): f"{base}/{name}" for name in row.card.get("files", {})},
        card=row.card,
    )


def activation_view(row: ModelActivation) -> ModelActivationView:
    return ModelActivationView(
        name=row.name,
        version=row.version,
        previous_version=row.previous_version,
        reason=row.reason,
        actor=row.actor,
        created_at=as_utc(row.created_at),
    )


def model_views(session: Session) -> list[ModelView]:
    """Every model name, newest version first, with the version that answers it."""
    by_name: dict[str, list[ModelVersion]] = defaultdict(list)
    for row in session.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version.desc())):
        by_name[row.name].append(row)
    return [
        ModelView(
            name=name,
            active_version=next((r.version for r in rows if r.is_active), None),
            classes=list(rows[0].classes),
            versions=[version_view(r) for r in rows],
        )
        for name, rows in by_name.items()
    ]
