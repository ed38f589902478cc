"""The promotion policies of a training run, and calibration in the evaluation report."""

from __future__ import annotations

import numpy as np

from services.trainer.comparison import decide_promotion
from services.trainer.evaluation import calibration

CANDIDATE = {"n": 100, "accuracy": 0.9, "roc_auc": 0.95}


def test_policies() -> None:
    assert decide_promotion("always", CANDIDATE, {"version": 1, "accuracy": 1.0, "roc_auc": 1.0})["promote"]
    assert not decide_promotion("manual", CANDIDATE, None)["promote"]
    assert decide_promotion("if_better", CANDIDATE, None)["promote"]  # nothing active yet
    better = decide_promotion("if_better", CANDIDATE, {"version": 3, "accuracy": 0.99, "roc_auc": 0.94})
    assert better["promote"] and better["metric"] == "roc_auc" and better["active_version"] == 3
    tie = decide_promotion("if_better", CANDIDATE, {"version": 3, "accuracy": 0.5, "roc_auc": 0.95})
    assert not tie["promote"]  # a tie keeps the active version
    assert not decide_promotion("if_better", CANDIDATE, {"version": 2, "error": "other classes"})["promote"]
    no_auc = decide_promotion(
        "if_better", {**CANDIDATE, "roc_auc": None}, {"version": 1, "accuracy": 0.8, "roc_auc": 0.9}
    )
    assert no_auc["metric"] == "accuracy" and no_auc["promote"]


def test_if_none_active_promotes_only_the_first_version() -> None:
    # Local training's default (`xrayq train`, the starter model): activate when nothing is active,
    # never replace an active version however much better the new one is.
    assert decide_promotion("if_none_active", CANDIDATE, None)["promote"]
    kept = decide_promotion("if_none_active", CANDIDATE, {"version": 2, "accuracy": 0.1, "roc_auc": 0.2})
    assert not kept["promote"] and "v2" in kept["reason"]
    assert not decide_promotion("if_none_active", CANDIDATE, {"version": 2, "error": "other classes"})["promote"]


def test_expected_calibration_error() -> None:
    labels = np.array([0, 1, 1, 0])
    # Always 100% confident and always right: perfectly calibrated.
    assert calibration(labels, np.eye(2)[labels])["ece"] == 0.0
    # 90% confident, right half of the time: off by 0.4.
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    result = calibration(labels, probabilities)
    assert abs(result["ece"] - 0.4) < 1e-9 and result["table"][0]["n"] == 4
