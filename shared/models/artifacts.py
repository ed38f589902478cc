"""Model artifacts in object storage: safetensors weights and a JSON card per version, and loading them.

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
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.storage import ObjectStore
from shared.db.models import ModelVersion, utcnow
from shared.imaging.preprocess import PreprocessSpec
from shared.models.architectures import explain_section
from shared.models.heads import Head
from shared.models.nets import build_model
from shared.models.ood import OodReference, load_reference
from shared.models.ownership import claim_model
from shared.models.registry import activate_version, any_active_version


def register_version(
    session: Session,
    store: ObjectStore,
    *,
    name: str,
    scope: str | None,
    architecture: str,
    classes: list[str],
    preprocessing: PreprocessSpec,
    state_dict: dict[str, torch.Tensor],
    metrics: dict[str, Any],
    data: dict[str, Any],
    training: dict[str, Any],
    activate: str = "if_none_active",
    intended_use: dict[str, list[str]] | None = None,
    provenance: dict[str, Any] | None = None,
    files: dict[str, tuple[bytes, str]] | None = None,
    extra_card: dict[str, dict[str, Any]] | None = None,
    attachments: dict[str, bytes] | None = None,
) -> ModelVersion:
    """Store weights, card and `files` (plots: name -> bytes, type), then add the version row.

    `extra_card`: more sections of the card (e.g. "ood"); a section whose "file" names one of the
    `attachments` (name -> bytes, stored beside the weights) gets that object's "key" and "sha256".

    `scope`: whose request it is (`Principal.scope`): the owner of `name`, or an admin (None); the
    first version of a name makes `scope` its owner (None: shared). Anyone else: `model_not_owned`.
    `activate`: "always", "if_none_active" or "never". `provenance` says where the version came
    from ({"dataset_id", "training_run_id", "evaluation", ...}) and goes into the card. `extra_card`:
    further sections of the card, each under its own key (e.g. "calibration", "uncertainty"); none may
    replace a key this function writes.

    Objects are written before the row is committed, so a row never points at missing bytes; a crash
    in between leaves only an unreferenced object behind.
    """
    claim_model(session, name, scope)
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
        "intended_use": intended_use or {},
        **(provenance or {}),
        "files": {name: f"{prefix}/{name}" for name in sorted(files or {})},
        "weights": {"format": "safetensors", "key": f"{prefix}/weights.safetensors", "sha256": weights_sha256},
        "created_at": utcnow().isoformat(),
    }
    explain = explain_section(architecture)
    if explain is not None:  # Grad-CAM's target layer: explanations of this version use what the card names
        card["explain"] = explain
    clashing = set(card) & set(extra_card or {})
    if clashing:
        raise ValueError(f"extra card sections may not replace {sorted(clashing)}")
    for section_name, section in (extra_card or {}).items():
        attached = (attachments or {}).get(section.get("file", ""))
        if attached is not None:
            section = {**section, "key": f"{prefix}/{section['file']}", "sha256": hashlib.sha256(attached).hexdigest()}
        card[section_name] = section
    store.put(card["weights"]["key"], weights)
    for attachment_name, content in (attachments or {}).items():
        store.put(f"{prefix}/{attachment_name}", content, "application/octet-stream")
    for file_name, (content, content_type) in (files or {}).items():
        store.put(f"{prefix}/{file_name}", content, content_type)
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
        dataset_id=(provenance or {}).get("dataset_id"),
        training_run_id=(provenance or {}).get("training_run_id"),
    )
    session.add(row)
    session.flush()
    if activate == "always":
        activate_version(session, row, reason="always")
    elif activate == "if_none_active" and not any_active_version(session, name):
        activate_version(session, row, reason="first_version")
    return row


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
    intended_use: dict[str, list[str]]
    head: Head  # the tap for features (out-of-distribution checks) and dropout samples (uncertainty)
    card: dict[str, Any]
    ood: OodReference | None = None  # None: a version registered without a reference (see `checks_of`)


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
        intended_use=dict(row.card.get("intended_use") or {}),
        head=Head(module),
        card=dict(row.card),
        ood=load_reference(row.card, store),
    )
