"""The model registry in the database: which versions exist and which one is active per name.

No torch here (the gateway uses it); storing and loading weights is in `shared.artifacts`.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.db.models import ModelVersion, utcnow
from shared.errors import XrayqError


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """'chest-xray' -> ('chest-xray', None); 'chest-xray@3' -> ('chest-xray', 3)."""
    name, _, version = ref.strip().partition("@")
    if not name:
        raise XrayqError("invalid_parameter", "A model reference is 'name' or 'name@version'.")
    if not version:
        return name, None
    if not version.isdigit():
        raise XrayqError("invalid_parameter", f"Model version must be a positive integer, not {version!r}.")
    return name, int(version)


def resolve_version(session: Session, name: str, version: int | None = None) -> ModelVersion:
    """The pinned version, or the active one of `name`."""
    query = select(ModelVersion).where(ModelVersion.name == name)
    query = (
        query.where(ModelVersion.version == version)
        if version is not None
        else query.where(ModelVersion.is_active.is_(True))
    )
    found = session.scalars(query).first()
    if found is None:
        if version is not None:
            raise XrayqError("model_not_found", f"Model {name}@{version} does not exist.")
        if session.scalars(select(ModelVersion.id).where(ModelVersion.name == name)).first() is None:
            raise XrayqError("model_not_found", f"No model named {name!r}.")
        raise XrayqError("no_active_model", f"Model {name!r} has no active version.")
    return found


def any_active_version(session: Session, name: str) -> bool:
    return (
        session.scalars(
            select(ModelVersion.id).where(ModelVersion.name == name, ModelVersion.is_active.is_(True))
        ).first()
        is not None
    )


def activate_version(session: Session, row: ModelVersion) -> None:
    session.execute(
        update(ModelVersion).where(ModelVersion.name == row.name, ModelVersion.id != row.id).values(is_active=False)
    )
    row.is_active = True
    row.activated_at = utcnow()
    session.flush()
