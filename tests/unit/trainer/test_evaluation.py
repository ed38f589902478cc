"""The validation figures that go into a model card."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.trainer.evaluation import classification_report


def binary_probabilities(positive: list[float]) -> np.ndarray:
    p = np.array(positive, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1)


def test_perfect_binary_predictions() -> None:
    labels = np.array([0, 1, 0, 1, 1, 0, 1])
    probabilities = binary_probabilities([0.1, 0.9, 0.2, 0.7, 0.95, 0.4, 0.6])
    report = classification_report(labels, probabilities, ["NORMAL", "PNEUMONIA"])

    assert report["n"] == 7
    assert report["accuracy"] == 1.0
    assert report["roc_auc"] == 1.0
    assert report["sensitivity"] == 1.0
    assert report["specificity"] == 1.0
    assert report["confusion_matrix"] == [[3, 0], [0, 4]]
    assert report["positive_class"] == "PNEUMONIA"
    assert report["classes"] == ["NORMAL", "PNEUMONIA"]
    for name, support in (("NORMAL", 3), ("PNEUMONIA", 4)):
        assert report["per_class"][name] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": support}


def test_known_binary_example_by_hand() -> None:
    # Predicted positive when p > 0.5: [0, 1, 0, 0 | 1, 0] against truth [0, 0, 0, 0 | 1, 1].
    labels = np.array([0, 0, 0, 0, 1, 1])
    probabilities = binary_probabilities([0.1, 0.6, 0.3, 0.2, 0.8, 0.4])
    report = classification_report(labels, probabilities, ["neg", "pos"])

    # tn=3 fp=1 / fn=1 tp=1
    assert report["confusion_matrix"] == [[3, 1], [1, 1]]
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["sensitivity"] == pytest.approx(1 / 2)
    assert report["specificity"] == pytest.approx(3 / 4)
    # Positive-negative pairs ranked right: 0.8 beats all 4 negatives, 0.4 beats 3 (not 0.6) -> 7/8.
    assert report["roc_auc"] == pytest.approx(7 / 8)
    neg, pos = report["per_class"]["neg"], report["per_class"]["pos"]
    # "neg" predicted 4 times (3 right); "pos" predicted twice (1 right).
    assert (neg["precision"], neg["recall"], neg["f1"], neg["support"]) == pytest.approx((0.75, 0.75, 0.75, 4))
    assert (pos["precision"], pos["recall"], pos["f1"], pos["support"]) == pytest.approx((0.5, 0.5, 0.5, 2))


def test_roc_auc_uses_the_second_column_as_positive() -> None:
    labels = np.array([0, 0, 1, 1])
    # Every prediction wrong and perfectly inverted: AUC 0, not 1.
    probabilities = binary_probabilities([0.9, 0.8, 0.2, 0.1])
    report = classification_report(labels, probabilities, ["a", "b"])
    assert report["roc_auc"] == 0.0
    assert report["accuracy"] == 0.0
    assert report["sensitivity"] == 0.0 and report["specificity"] == 0.0
    assert report["confusion_matrix"] == [[0, 2], [2, 0]]


def test_three_classes_give_macro_roc_auc_and_no_sensitivity() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.6, 0.3, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.5, 0.4],
            [0.1, 0.2, 0.7],
            [0.5, 0.1, 0.4],  # a class-2 image predicted as class 0
        ]
    )
    report = classification_report(labels, probabilities, ["a", "b", "c"])

    assert report["accuracy"] == pytest.approx(5 / 6)
    assert report["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [1, 0, 1]]
    # One-vs-rest AUCs: a = 1, b = 1, c = (4 + 3 + 0.5 for the 0.4 tie) / 8 = 0.9375; macro mean.
    assert report["roc_auc"] == pytest.approx((1 + 1 + 0.9375) / 3)
    for key in ("sensitivity", "specificity", "positive_class"):
        assert key not in report
    assert report["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert report["per_class"]["a"]["precision"] == pytest.approx(2 / 3)


def test_one_class_present_gives_no_roc_auc() -> None:
    labels = np.array([1, 1, 1])
    probabilities = binary_probabilities([0.9, 0.3, 0.8])
    report = classification_report(labels, probabilities, ["NORMAL", "PNEUMONIA"])

    assert report["roc_auc"] is None
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["confusion_matrix"] == [[0, 0], [1, 2]]
    assert report["sensitivity"] == pytest.approx(2 / 3)
    assert report["specificity"] is None  # no negatives to be specific about
    assert report["per_class"]["NORMAL"]["support"] == 0


def test_one_class_present_among_three_gives_no_roc_auc() -> None:
    labels = np.array([2, 2])
    probabilities = np.array([[0.1, 0.1, 0.8], [0.5, 0.2, 0.3]])
    report = classification_report(labels, probabilities, ["a", "b", "c"])
    assert report["roc_auc"] is None
    assert report["confusion_matrix"] == [[0, 0, 0], [0, 0, 0], [1, 0, 1]]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_multiclass_with_a_class_absent_gives_no_nan_roc_auc() -> None:
    labels = np.array([0, 0, 1, 1])  # class "c" has no validation images
    probabilities = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4]])
    report = classification_report(labels, probabilities, ["a", "b", "c"])
    assert report["roc_auc"] is None or math.isfinite(report["roc_auc"]), report["roc_auc"]
