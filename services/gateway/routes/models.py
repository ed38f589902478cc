"""The model registry, read-only for now: names, versions, their cards' metrics."""

from __future__ import annotations

from collections import defaultdict

from fastapi import APIRouter
from sqlalchemy import select

from services.gateway.deps import PrincipalDep, SessionDep
from services.gateway.problems import PROBLEMS
from shared.db.models import ModelVersion, as_utc
from shared.errors import XrayqError
from shared.schemas import ModelVersionView, ModelView

router = APIRouter(prefix="/v1/models", tags=["models"])


def version_view(row: ModelVersion) -> ModelVersionView:
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
    )


@router.get("", response_model=list[ModelView], responses=PROBLEMS)
def list_models(session: SessionDep, _: PrincipalDep) -> list[ModelView]:
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


@router.get("/{name}/versions/{version}", response_model=ModelVersionView, responses=PROBLEMS)
def read_model_version(name: str, version: int, session: SessionDep, _: PrincipalDep) -> ModelVersionView:
    row = session.scalars(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    ).first()
    if row is None:
        raise XrayqError("model_not_found", f"Model {name}@{version} does not exist.")
    return version_view(row)
