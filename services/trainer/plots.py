"""The evaluation plots stored with every trained version: confusion matrix, ROC curve, learning curves,
reliability diagram, and the figures under corruption (robustness)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render straight to PNG bytes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# What `render_plots` draws; `robustness_plot` adds robustness.png when the robustness step runs.
PLOT_NAMES = ("confusion_matrix.png", "roc_curve.png", "learning_curves.png", "reliability.png")


def render_plots(
    report: dict[str, Any], roc: dict[str, dict[str, list[float]]], history: list[dict[str, Any]], title: str
) -> dict[str, bytes]:
    """PNG bytes per plot name."""
    return {
        "confusion_matrix.png": _png(_confusion_matrix(report, title)),
        "roc_curve.png": _png(_roc_curve(report, roc, title)),
        "learning_curves.png": _png(_learning_curves(history, title)),
        "reliability.png": _png(_reliability(report["calibration"], title)),
    }


def _confusion_matrix(report: dict[str, Any], title: str) -> Figure:
    matrix = np.array(report["confusion_matrix"])
    classes = report["classes"]
    figure, axes = plt.subplots(figsize=(1.6 + 0.9 * len(classes), 1.2 + 0.9 * len(classes)), dpi=110)
    axes.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        dark = count > matrix.max() / 2
        axes.text(column, row, str(count), ha="center", va="center", color="white" if dark else "black")
    axes.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{title}\naccuracy {report['accuracy']:.3f} (n={report['n']})", fontsize=9)
    return figure


def _roc_curve(report: dict[str, Any], roc: dict[str, dict[str, list[float]]], title: str) -> Figure:
    figure, axes = plt.subplots(figsize=(4.5, 4.2), dpi=110)
    for name, curve in roc.items():
        axes.plot(curve["fpr"], curve["tpr"], label=name)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    auc = report.get("roc_auc")
    axes.set_title(f"{title}\nROC-AUC {auc:.3f}" if auc is not None else title, fontsize=9)
    axes.set_xlabel("false positive rate (1 - specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    if roc:
        axes.legend(loc="lower right", fontsize=8)
    return figure


def _learning_curves(history: list[dict[str, Any]], title: str) -> Figure:
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(8, 3.4), dpi=110)
    epochs = [h["epoch"] for h in history]
    losses.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    losses.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation loss")
    losses.set_xlabel("epoch")
    losses.legend(fontsize=8)
    scores.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="validation accuracy")
    aucs = [h.get("val_roc_auc") for h in history]
    if any(a is not None for a in aucs):
        scores.plot(epochs, [np.nan if a is None else a for a in aucs], marker="o", label="validation ROC-AUC")
    scores.set_xlabel("epoch")
    scores.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    return figure


def _reliability(calibration: dict[str, Any], title: str) -> Figure:
    """Accuracy against confidence per bin (`calibration` as `services.trainer.evaluation.calibration`
    makes it), after temperature scaling and, when the report has it, before; the diagonal is perfect."""
    figure, axes = plt.subplots(figsize=(4.5, 4.2), dpi=110)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    curves = [("before", calibration.get("before"), "tab:orange"), ("calibrated", calibration, "tab:blue")]
    for name, curve, colour in curves:
        if not curve or not curve.get("table"):
            continue
        rows = curve["table"]
        total = sum(row["n"] for row in rows)
        axes.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], color=colour, alpha=0.8)
        axes.scatter(
            [r["confidence"] for r in rows],
            [r["accuracy"] for r in rows],
            s=[20 + 300 * r["n"] / total for r in rows],  # area: the bin's share of the images
            color=colour,
            alpha=0.8,
            label=f"{name}: ECE {curve['ece']:.3f}",
        )
    temperature = calibration.get("temperature")
    suffix = f", temperature {temperature:.2f}" if temperature else ", not calibrated"
    axes.set_title(f"{title}\nreliability ({calibration.get('bins', 15)} bins){suffix}", fontsize=9)
    axes.set_xlabel("confidence (probability of the answered class)")
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.legend(loc="upper left", fontsize=8)
    return figure


def robustness_plot(robustness: dict[str, Any], title: str) -> bytes:
    """ROC-AUC and specificity (accuracy without two classes) against severity, one line per corruption;
    severity 0 is the clean image."""
    rows = robustness["corruptions"]
    thresholded = "specificity" if any(row.get("specificity") is not None for row in rows) else "accuracy"
    figure, panels = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    for panel, key in zip(panels, ("roc_auc", thresholded), strict=True):
        for name in dict.fromkeys(row["corruption"] for row in rows):
            points = [(0, robustness["clean"].get(key))] + [
                (row["severity"], row.get(key)) for row in rows if row["corruption"] == name
            ]
            panel.plot(
                [severity for severity, _ in points],
                [np.nan if value is None else value for _, value in points],
                marker="o",
                markersize=3,
                label=name,
            )
        panel.set_xlabel("severity (0: clean)")
        panel.set_ylabel(key)
        proxy = robustness["proxy"].get(f"mean_{key}")
        panel.set_title(f"{key}: mean under corruption {proxy:.3f}" if proxy is not None else key, fontsize=9)
    panels[1].legend(fontsize=6, loc="lower left", ncol=2)
    figure.suptitle(f"{title}\n{robustness['n']} images x {len(rows)} corruptions", fontsize=9)
    return _png(figure)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
