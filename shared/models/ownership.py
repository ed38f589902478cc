"""Who owns a model name, who may change it, who may use it, and who may read its provenance.

A `scope` is what `Principal.scope` says: the organisation a key acts for, or None for an admin (and
the open embedded mode), which may do anything. Owners: an organisation, or None for a shared model
(the starter model, anything an admin registered first). The rules, in one place:

- manage (register a version into, promote, roll back): the owner's keys, or an admin; a shared model
  only an admin.
- use (submit jobs, fine-tune from, list, read the card): shared models and one's own; another
  organisation's model does not exist for them (404 `model_not_found`, never a hint that it does).
- read provenance (dataset names and ids, hosts, run ids, who activated what): the owner and admins.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.db.models import RegisteredModel


@dataclass(frozen=True)
class Actor:
    """Who changes a model: what it may manage (`scope`), and the key and organisation to record."""

    scope: str | None
    organisation: str | None = None
    key_id: str | None = None
    # What the activation log shows as the actor: a run ("training-run:<id>"), else the organisation.
    label: str | None = None


ADMIN = Actor(scope=None)  # local commands, tests, the open mode


def may_manage(owner: str | None, scope: str | None) -> bool:
    return scope is None or (owner is not None and owner == scope)


def may_use(owner: str | None, scope: str | None) -> bool:
    return scope is None or owner is None or owner == scope


def find_model(session: Session, name: str, *, lock: bool = False) -> RegisteredModel | None:
    query = select(RegisteredModel).where(RegisteredModel.name == name)
    return session.scalars(query.with_for_update() if lock else query).first()


def is_usable(session: Session, name: str, scope: str | None) -> bool:
    model = find_model(session, name)
    return model is None or may_use(model.owner, scope)


def check_may_use(session: Session, name: str, scope: str | None) -> RegisteredModel | None:
    """The model row (None for a name nothing was registered under yet); another organisation's: 404."""
    model = find_model(session, name)
    if model is not None and not may_use(model.owner, scope):
        raise XrayqError("model_not_found", f"No model named {name!r}.")
    return model


def check_may_manage(session: Session, name: str, scope: str | None, *, lock: bool = False) -> RegisteredModel | None:
    """Refuse a change of `name` by a key that neither owns it nor is an admin (403 `model_not_owned`).

    A model the key may not even use answers as missing, as everywhere else. None: no such model yet.
    """
    model = find_model(session, name, lock=lock)
    if model is None or may_manage(model.owner, scope):
        return model
    if not may_use(model.owner, scope):
        raise XrayqError("model_not_owned", f"The model name {name!r} belongs to another organisation.")
    raise XrayqError("model_not_owned", f"{name!r} is a shared model: only an admin may change it.")


def claim_model(session: Session, name: str, scope: str | None) -> RegisteredModel:
    """The model a new version of `name` goes into, made (owned by `scope`) if it is the first.

    Locks the row (Postgres), so the check and the registration that follows see one owner; two first
    registrations of a new name race on its primary key and the second fails.
    """
    model = check_may_manage(session, name, scope, lock=True)
    if model is None:
        model = RegisteredModel(name=name, owner=scope)
        session.add(model)
        session.flush()
    return model
