"""Robustness in the evaluation report: a model's figures under scanner-like corruptions.

The validation split comes from the training collection and flatters the model: on a later collection
(another scanner, another export) the starter's specificity fell from 0.97 to 0.73 while validation
said nothing (issue 13). The corrupted copies of the evaluation images (`shared.imaging.corruptions`:
twelve corruptions, three severities, fixed seed) reproduce that kind of fall, so every version's
report carries, per corruption and severity, ROC-AUC beside the thresholded figures (accuracy,
sensitivity, specificity), and a summary, the *shift proxy*: mean ROC-AUC, mean and worst specificity
(and sensitivity, accuracy) over the corruptions, and the gap to the clean figures of the same images.

Corruptions are applied to the uint8 model pixels before the model's own normalisation, so each
version is judged through its own preprocessing (its card's spec), as it would be served.

Cost: 36 corrupted copies of the images, for the candidate and again for the active version. On at
most `IMAGES_PER_CLASS` images of each class (evenly spaced, so the same ones every time), the two
together take about a tenth of the recipe's training compute; a class-balanced subset also measures
specificity on as many normal images as sensitivity on abnormal ones. The clean figures beside the
table are of the same subset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from services.trainer.data import LabelledImages
from services.trainer.evaluation import classification_report
from services.trainer.training import predict_probabilities
from shared.imaging.corruptions import Corruption, corrupt, suite
from shared.imaging.preprocess import PreprocessSpec

CORRUPTION_SEED = 0
IMAGES_PER_CLASS = 128
FIGURES = ("accuracy", "roc_auc", "sensitivity", "specificity")


def robustness_report(
    model: torch.nn.Module,
    images: LabelledImages,
    spec: PreprocessSpec,
    device: torch.device,
    split: str,
    corruptions: list[Corruption] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The model's figures on every corrupted copy of (a class-balanced subset of) `images`, the shift
    proxy, and its gap to the clean figures of the same subset."""
    corruptions = suite() if corruptions is None else corruptions
    chosen = evenly_per_class(images.labels, IMAGES_PER_CLASS, images.names)
    images = images.subset(chosen) if len(chosen) < len(images) else images
    labels = images.labels.numpy()
    clean = classification_report(labels, predict_probabilities(model, images, spec, device), images.classes)
    rows = []
    for done, corruption in enumerate(corruptions, 1):
        corrupted = LabelledImages(
            corrupt(images.pixels, corruption, CORRUPTION_SEED), images.labels, images.classes, []
        )
        report = classification_report(labels, predict_probabilities(model, corrupted, spec, device), images.classes)
        rows.append({"corruption": corruption.name, "severity": corruption.severity, **_figures(report)})
        if progress is not None:
            progress(done, len(corruptions))
    proxy = shift_proxy(rows)
    clean_figures = _figures(clean)
    return {
        "split": split,
        "n": len(images),
        "images": f"at most {IMAGES_PER_CLASS} per class, evenly spaced in file-name order",
        "seed": CORRUPTION_SEED,
        "applied_to": "uint8 model pixels, before the model's normalisation",
        "corruptions": rows,
        "proxy": proxy,
        "clean": clean_figures,
        "gap": {
            key: clean_figures[key] - proxy[f"mean_{key}"]
            for key in FIGURES
            if clean_figures.get(key) is not None and proxy.get(f"mean_{key}") is not None
        },
    }


def evenly_per_class(labels: torch.Tensor, cap: int, names: list[str] | None = None) -> np.ndarray:
    """Indices of at most `cap` images of each class, spread evenly over the class's images in name
    order (so a candidate and the active version, loading one set in different orders, get the same
    images), else in the given order."""
    chosen: list[int] = []
    for label in labels.unique().tolist():
        members = np.flatnonzero(labels.numpy() == label)
        if names:
            members = np.array(sorted(members, key=lambda index: names[index]), dtype=np.int64)
        if len(members) > cap:
            members = members[np.unique(np.round(np.linspace(0, len(members) - 1, cap)).astype(int))]
        chosen.extend(members.tolist())
    return np.array(sorted(chosen), dtype=np.int64)


def shift_proxy(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each figure over the corruptions, and the worst one with the corruption that gave it."""
    proxy: dict[str, Any] = {"corruptions": len(rows)}
    for key in FIGURES:
        values = [(row[key], f"{row['corruption']}@{row['severity']}") for row in rows if row.get(key) is not None]
        if not values:
            continue
        proxy[f"mean_{key}"] = float(np.mean([value for value, _ in values]))
        proxy[f"worst_{key}"], proxy[f"worst_{key}_under"] = min(values)
    return proxy


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    return {key: report[key] for key in FIGURES if key in report}
