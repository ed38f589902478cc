"""Evaluation of a trained model on held-out data: the figures that go into its card."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


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
    report["decision_rule"] = (
        f"{classes[1]} when its probability >= 0.5 (argmax)" if len(classes) == 2 else "argmax over classes"
    )
    report["threshold"] = 0.5 if len(classes) == 2 else None
    report["calibration"] = calibration(labels, probabilities)
    if len(classes) == 2:
        (tn, fp), (fn, tp) = report["confusion_matrix"]
        report["positive_class"] = classes[1]
        report["sensitivity"] = tp / (tp + fn) if tp + fn else None
        report["specificity"] = tn / (tn + fp) if tn + fp else None
    return report


def calibration(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Expected calibration error of the top-class confidence (equal-width bins), with the reliability table.

    ECE = sum over bins of (share of examples) x |accuracy - mean confidence|.
    """
    if len(labels) == 0:
        return {"ece": None, "bins": bins, "table": []}
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    table = []
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        accuracy, mean_confidence = float(correct[members].mean()), float(confidence[members].mean())
        ece += members.mean() * abs(accuracy - mean_confidence)
        table.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": int(members.sum()),
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return {"ece": float(ece), "bins": bins, "table": table}


def roc_points(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, dict[str, list[float]]]:
    """ROC curve per class (one-vs-rest; for two classes, only the positive one), for plotting."""
    positives = [1] if len(classes) == 2 else list(range(len(classes)))
    curves = {}
    for index in positives:
        truth = labels == index
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, probabilities[:, index])
        curves[classes[index]] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return curves
