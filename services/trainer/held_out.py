"""A model's held-out set, for the trainer: the owner's images every `if_better` run of the model is
judged on, as examples to score (stored by `shared.training.held_out`).

Whoever submits a run (the owner's data scientists, an admin) brings their own dataset, and with it
their own test split; judged on that, the submitter would choose the yardstick. So a model keeps one
set of images, recorded from the evaluation images of the run that made its first version (the owner's
test split, or the fixed validation split carved from the owner's training images), and a later run
compares candidate and active version on that set. When a run's own evaluation images are that set
(the owner retraining on the same data), nothing changes: its report is the comparison.

The images themselves are the dataset's blobs, stored once by content. The owner or an admin may set
another split of one of their datasets as the set (`PUT /v1/models/{name}/evaluation-set`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.orm import Session

from services.trainer.data import Example
from shared.core.storage import ObjectStore
from shared.models.ownership import find_model
from shared.training.datasets import blob_key
from shared.training.held_out import read_held_out, store_held_out


@dataclass
class HeldOutSet:
    """Images to compare versions on, and where they came from (`record`, as the model keeps it)."""

    split: str
    classes: list[str]
    examples: list[Example]
    files: list[dict[str, str]]  # path, label, sha256
    record: dict[str, Any]

    def same_images(self, other: HeldOutSet) -> bool:
        return sorted((f["sha256"], f["label"]) for f in self.files) == sorted(
            (f["sha256"], f["label"]) for f in other.files
        )

    def describe(self) -> dict[str, Any]:
        """What a promotion decision says it was judged on."""
        return {"dataset_id": self.record.get("dataset_id"), "split": self.split, "n": len(self.files)}


def examples_of(store: ObjectStore, files: list[dict[str, str]], classes: list[str]) -> list[Example]:
    index = {label: i for i, label in enumerate(classes)}
    return [Example(f["path"], index[f["label"]], partial(store.get, blob_key(f["sha256"]))) for f in files]


def runs_own_set(
    store: ObjectStore, manifest: dict[str, Any], split: str, classes: list[str], examples: list[Example]
) -> HeldOutSet:
    """A run's evaluation images as a held-out set (what the model records if it has none yet)."""
    by_path = {entry["path"]: entry for entry in manifest["files"]}
    files = [
        {"path": e.name, "label": classes[e.label], "sha256": by_path[e.name]["sha256"]}
        for e in examples
        if e.name in by_path
    ]
    record = {"dataset_id": manifest["id"], "split": split, "classes": classes, "n": len(files)}
    return HeldOutSet(split, classes, examples, files, record)


def load_model_set(session: Session, store: ObjectStore, name: str) -> HeldOutSet | None:
    """The held-out set `name` recorded; None for a new name, or one registered before sets existed."""
    model = find_model(session, name)
    if model is None or not model.evaluation_set:
        return None
    record = dict(model.evaluation_set)
    stored = read_held_out(store, record)
    classes: list[str] = stored["classes"]
    files: list[dict[str, str]] = stored["files"]
    return HeldOutSet(record["split"], classes, examples_of(store, files, classes), files, record)


def record_model_set(session: Session, store: ObjectStore, name: str, held_out: HeldOutSet) -> None:
    """Make `held_out` the set of `name` if it has none yet (its first version, or a model from before)."""
    model = find_model(session, name, lock=True)
    if model is None or model.evaluation_set:
        return
    held_out.record = store_held_out(
        store,
        model,
        dataset_id=held_out.record["dataset_id"],
        split=held_out.split,
        classes=held_out.classes,
        files=held_out.files,
    )
