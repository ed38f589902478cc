"""A model's held-out set as stored: the owner's images every `if_better` run of the model is judged on.

A JSON list of files by content (path, label, sha256) in object storage, next to the model's versions,
recorded on the model row (`RegisteredModel.evaluation_set`). The trainer records the first version's
evaluation images (`services/trainer/held_out.py`); the owner or an admin may set another split of one
of their datasets (`PUT /v1/models/{name}/evaluation-set`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.storage import ObjectStore
from shared.db.models import Dataset, ModelVersion, RegisteredModel
from shared.training.datasets import load_manifest


def store_held_out(
    store: ObjectStore, model: RegisteredModel, *, dataset_id: str, split: str, classes: list[str], files: list[dict]
) -> dict[str, Any]:
    """Write the set, make it `model`'s, and return its record."""
    content = json.dumps(
        {"dataset_id": dataset_id, "split": split, "classes": classes, "files": files}, sort_keys=True
    ).encode()
    digest = hashlib.sha256(content).hexdigest()
    key = f"models/{model.name}/held-out/{digest}.json"
    store.put(key, content, "application/json")
    model.evaluation_set = {
        "dataset_id": dataset_id,
        "split": split,
        "classes": classes,
        "n": len(files),
        "key": key,
        "sha256": digest,
    }
    return dict(model.evaluation_set)


def read_held_out(store: ObjectStore, record: dict[str, Any]) -> dict[str, Any]:
    """The stored set ({"classes", "files", ...}), checked against the sha256 its model recorded."""
    content = store.get(record["key"])
    if hashlib.sha256(content).hexdigest() != record["sha256"]:
        raise XrayqError("model_corrupt", f"The held-out set {record['key']!r} does not match its sha256.")
    stored: dict[str, Any] = json.loads(content)
    return stored


def set_from_dataset(
    session: Session, store: ObjectStore, model: RegisteredModel, dataset: Dataset, split: str | None
) -> dict[str, Any]:
    """Make a split of `dataset` (default: `test`, else `val`) the held-out set of `model`.

    Its classes must be the model's, in order: the versions are scored on them as they are.
    """
    counts = dataset.counts or {}
    split = split or ("test" if counts.get("test") else "val")
    if not counts.get(split):
        raise XrayqError("invalid_parameter", f"Dataset {dataset.name}@{dataset.version} has no {split!r} split.")
    latest = session.scalars(
        select(ModelVersion).where(ModelVersion.name == model.name).order_by(ModelVersion.version.desc())
    ).first()
    if latest is not None and list(latest.classes) != list(dataset.classes):
        raise XrayqError(
            "invalid_parameter", f"{model.name!r} has classes {latest.classes}; the dataset has {dataset.classes}."
        )
    manifest = load_manifest(store, dataset)
    files = [
        {"path": entry["path"], "label": entry["label"], "sha256": entry["sha256"]}
        for entry in manifest["files"]
        if entry["split"] == split
    ]
    return store_held_out(store, model, dataset_id=dataset.id, split=split, classes=list(dataset.classes), files=files)
