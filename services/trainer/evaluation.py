"""Evaluation of a trained model on held-out data: the figures that go into its card."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score


def classification_report(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, ROC-AUC, confusion matrix and per-class precision/recall/F1 from predicted probabilities.

    For two classes the second class is the positive one (PNEUMONIA, Parasitized, ...), and sensitivity
    and specificity are reported for it.
    """
    predictions = probabilities.argmax(axis=1)
    all_labels = list(range(len(classes)))
    report: dict[str, Any] = {
        "n": int(labels.shape[0]),
        "accuracy": float(accuracy_score(labels, predictions)),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=all_labels).tolist(),
        "confusion_matrix_axes": "rows: true class, columns: predicted class, in `classes` order",
        "classes": classes,
    }
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=all_labels, zero_division=0
    )
    report["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }
    present = np.unique(labels)
    if len(present) < 2:
        report["roc_auc"] = None  # undefined with one class present
    elif len(classes) == 2:
        report["roc_auc"] = float(roc_auc_score(labels, probabilities[:, 1]))
    else:
        report["roc_auc"] = float(
            roc_auc_score(labels, probabilities, multi_class="ovr", average="macro", labels=all_labels)
        )
    if report["roc_auc"] is not None and not math.isfinite(report["roc_auc"]):
        report["roc_auc"] = None  # e.g. a class absent from the evaluation set: undefined, not NaN
    if len(classes) == 2:
        (tn, fp), (fn, tp) = report["confusion_matrix"]
        report["positive_class"] = classes[1]
        report["sensitivity"] = tp / (tp + fn) if tp + fn else None
        report["specificity"] = tn / (tn + fp) if tn + fp else None
    return report
