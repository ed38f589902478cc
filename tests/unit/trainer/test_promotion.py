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


PROXY = {"mean_roc_auc": 0.98, "mean_accuracy": 0.92, "mean_sensitivity": 0.93, "mean_specificity": 0.90}


def with_proxy(figures: dict, **proxy: float) -> dict:
    return {**figures, "robustness": {"proxy": {**PROXY, **proxy}}}


def test_if_better_keeps_the_active_version_when_the_candidate_is_worse_under_shift() -> None:
    champion = {"version": 3, "accuracy": 0.9, "roc_auc": 0.94, "shift_proxy": PROXY}
    # Better on the clean held-out images, but its specificity under corruption falls by more than 0.05.
    worse = decide_promotion("if_better", with_proxy(CANDIDATE, mean_specificity=0.84), champion)
    assert not worse["promote"]
    assert worse["shift_proxies"]["worse_on"] == ["mean_specificity"]
    assert worse["shift_proxies"]["candidate"]["mean_specificity"] == 0.84
    assert worse["shift_proxies"]["active"]["mean_specificity"] == 0.90
    assert "worse under shift: mean_specificity 0.8400 < 0.9000 - 0.05" in worse["reason"]
    lower_auc = decide_promotion("if_better", with_proxy(CANDIDATE, mean_roc_auc=0.97), champion)
    assert not lower_auc["promote"] and lower_auc["shift_proxies"]["worse_on"] == ["mean_roc_auc"]


def test_if_better_promotes_within_the_tolerance_and_records_the_figures() -> None:
    champion = {"version": 3, "accuracy": 0.9, "roc_auc": 0.94, "shift_proxy": PROXY}
    close = decide_promotion("if_better", with_proxy(CANDIDATE, mean_roc_auc=0.976, mean_specificity=0.86), champion)
    assert close["promote"] and close["shift_proxies"]["compared"] and close["shift_proxies"]["worse_on"] == []
    assert "not worse on the shift proxies" in close["reason"]
    # Better under shift does not rescue a candidate that is worse on the clean images.
    clean_worse = decide_promotion(
        "if_better", with_proxy(CANDIDATE, mean_specificity=0.99), {**champion, "roc_auc": 0.96}
    )
    assert not clean_worse["promote"]


def test_without_a_proxy_on_either_side_the_clean_comparison_decides_and_says_so() -> None:
    champion = {"version": 3, "accuracy": 0.9, "roc_auc": 0.94}
    decision = decide_promotion("if_better", with_proxy(CANDIDATE), champion)
    assert decision["promote"] and not decision["shift_proxies"]["compared"]
    assert "the active version has no shift proxy" in decision["reason"]
