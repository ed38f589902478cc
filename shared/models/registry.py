"""The model registry in the database: which versions exist and which one is active per name.

No torch here (the gateway uses it); storing and loading weights is in `shared.models.artifacts`.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.db.models import ModelActivation, ModelVersion, utcnow
from shared.models.ownership import ADMIN, Actor, check_may_manage, is_usable


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


def activate_version(session: Session, row: ModelVersion, reason: str = "promote", actor: Actor = ADMIN) -> None:
    """Make `row` the active version of its name, and record the change (what rollback goes back to).

    The row lock on the current active version (Postgres) serialises concurrent promotions of one name.
    """
    current = session.scalars(
        select(ModelVersion).where(ModelVersion.name == row.name, ModelVersion.is_active.is_(True)).with_for_update()
    ).first()
    if current is not None and current.id == row.id:
        return
    session.execute(
        update(ModelVersion).where(ModelVersion.name == row.name, ModelVersion.id != row.id).values(is_active=False)
    )
    row.is_active = True
    row.activated_at = utcnow()
    session.add(
        ModelActivation(
            name=row.name,
            model_version_id=row.id,
            version=row.version,
            previous_version=current.version if current is not None else None,
            reason=reason,
            actor=actor.label or actor.organisation,
            actor_key_id=actor.key_id,
            actor_organisation=actor.organisation,
        )
    )
    session.flush()


def find_version(session: Session, name: str, version: int) -> ModelVersion:
    row = session.scalars(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    ).first()
    if row is None:
        if session.scalars(select(ModelVersion.id).where(ModelVersion.name == name)).first() is None:
            raise XrayqError("model_not_found", f"No model named {name!r}.")
        raise XrayqError("model_not_found", f"Model {name}@{version} does not exist.")
    return row


def promote(session: Session, name: str, version: int, actor: Actor) -> ModelVersion:
    """Make name@version active; promoting an older version is a rollback to it. Owner or admin only."""
    check_may_manage(session, name, actor.scope)
    row = find_version(session, name, version)
    activate_version(session, row, reason="promote", actor=actor)
    return row


def promote_by_id(session: Session, name: str, version_id: str, actor: Actor) -> ModelVersion:
    """Promote a version given by id, refusing one that belongs to another model name."""
    check_may_manage(session, name, actor.scope)
    row = session.get(ModelVersion, version_id)
    if row is None or (row.name != name and not is_usable(session, row.name, actor.scope)):
        raise XrayqError("model_not_found", f"No model version with id {version_id!r}.")
    if row.name != name:
        raise XrayqError(
            "model_name_mismatch", f"Version {row.name}@{row.version} belongs to {row.name!r}, not {name!r}."
        )
    activate_version(session, row, reason="promote", actor=actor)
    return row


def rollback(session: Session, name: str, actor: Actor) -> ModelVersion:
    """Undo the last promotion: re-activate the version that was active before it.

    Activations form a stack (a promotion pushes, a rollback pops), so two rollbacks after promoting
    v1, v2, v3 return to v1, not back and forth between v2 and v3. Owner or admin only.
    """
    check_may_manage(session, name, actor.scope)
    history = session.scalars(
        select(ModelActivation).where(ModelActivation.name == name).order_by(ModelActivation.id)
    ).all()
    if not history and session.scalars(select(ModelVersion.id).where(ModelVersion.name == name)).first() is None:
        raise XrayqError("model_not_found", f"No model named {name!r}.")
    stack: list[int] = []
    for activation in history:
        if activation.reason == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(activation.version)
    if len(stack) < 2:
        raise XrayqError("no_previous_version", f"Model {name!r} has no earlier active version to roll back to.")
    row = find_version(session, name, stack[-2])
    activate_version(session, row, reason="rollback", actor=actor)
    return row


def activation_history(session: Session, name: str, limit: int = 100) -> list[ModelActivation]:
    return list(
        session.scalars(
            select(ModelActivation).where(ModelActivation.name == name).order_by(ModelActivation.id.desc()).limit(limit)
        )
    )
