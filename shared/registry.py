"""The model registry: versions, their cards and weights, which one is active, and loading them.

Weights are stored as safetensors (no pickled code) next to a JSON card that says everything needed to
serve the model exactly as it was trained: architecture, classes, preprocessing, metrics, data, sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.db.models import ModelVersion, utcnow
from shared.errors import XrayqError
from shared.imaging import PreprocessSpec
from shared.nets import build_model
from shared.storage import ObjectStore


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


def register_version(
    session: Session,
    store: ObjectStore,
    *,
    name: str,
    architecture: str,
    classes: list[str],
    preprocessing: PreprocessSpec,
    state_dict: dict[str, torch.Tensor],
    metrics: dict[str, Any],
    data: dict[str, Any],
    training: dict[str, Any],
    activate: str = "if_none_active",
) -> ModelVersion:
    """Store weights and card, then add the version row; activate it per `activate`.

    Objects are written before the row is committed, so a row never points at missing bytes; a crash
    in between leaves only an unreferenced object behind.
    """
    weights = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    weights_sha256 = hashlib.sha256(weights).hexdigest()
    # Version numbers are per name; the unique constraint turns a racing registration into an error.
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
    version = (latest or 0) + 1
    prefix = f"models/{name}/{version}"
    card: dict[str, Any] = {
        "name": name,
        "version": version,
        "architecture": architecture,
        "classes": classes,
        "preprocessing": preprocessing.to_dict(),
        "metrics": metrics,
        "data": data,
        "training": training,
        "weights": {"format": "safetensors", "key": f"{prefix}/weights.safetensors", "sha256": weights_sha256},
        "created_at": utcnow().isoformat(),
    }
    store.put(card["weights"]["key"], weights)
    store.put(f"{prefix}/card.json", json.dumps(card, indent=2).encode(), "application/json")
    row = ModelVersion(
        name=name,
        version=version,
        architecture=architecture,
        classes=classes,
        weights_key=card["weights"]["key"],
        card_key=f"{prefix}/card.json",
        weights_sha256=weights_sha256,
        card=card,
        metrics=metrics,
    )
    session.add(row)
    session.flush()
    if activate == "always" or (activate == "if_none_active" and not any_active_version(session, name)):
        activate_version(session, row)
    return row


def activate_version(session: Session, row: ModelVersion) -> None:
    session.execute(
        update(ModelVersion).where(ModelVersion.name == row.name, ModelVersion.id != row.id).values(is_active=False)
    )
    row.is_active = True
    row.activated_at = utcnow()
    session.flush()


@dataclass
class LoadedModel:
    """A model ready to serve, with everything the card says about how to feed it."""

    id: str
    name: str
    version: int
    classes: list[str]
    spec: PreprocessSpec
    module: torch.nn.Module
    device: torch.device


def load_model(row: ModelVersion, store: ObjectStore, device: torch.device) -> LoadedModel:
    """Fetch weights, check their sha256 against the registry, and build the network in eval mode."""
    weights = store.get(row.weights_key)
    if hashlib.sha256(weights).hexdigest() != row.weights_sha256:
        raise XrayqError("model_corrupt", f"Weights of {row.name}@{row.version} do not match their sha256.")
    module = build_model(row.architecture, len(row.classes))
    module.load_state_dict(load_safetensors(weights))
    module.eval().to(device)
    return LoadedModel(
        id=row.id,
        name=row.name,
        version=row.version,
        classes=list(row.classes),
        spec=PreprocessSpec.from_dict(row.card["preprocessing"]),
        module=module,
        device=device,
    )
