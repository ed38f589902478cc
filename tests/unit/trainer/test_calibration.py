"""Calibration fitted on validation: the temperature, the ECE it is judged by, the uncertainty threshold,
and the same probabilities in the trainer's evaluation as in the worker's results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.trainer.calibration import (
    FLAGGED_SHARE,
    calibrate,
    calibrated_evaluation,
    fit_temperature,
    negative_log_likelihood,
)
from services.trainer.data import LabelledImages
from services.trainer.evaluation import calibration
from services.trainer.plots import PLOT_NAMES, render_plots
from services.worker.inference import _probabilities
from shared.imaging.preprocess import PreprocessSpec, normalize
from shared.models.artifacts import LoadedModel
from shared.models.calibration import TEMPERATURE_BOUNDS
from shared.models.heads import Head

SPEC = PreprocessSpec(size=48, color="grayscale", mean=(0.5,), std=(0.25,))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """True logits and labels drawn from their softmax: softmax(true logits) is perfectly calibrated."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * 2.5
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


@pytest.mark.parametrize(("true_temperature", "classes"), [(2.5, 2), (0.5, 3), (1.0, 5)])
def test_the_fit_recovers_a_known_temperature(true_temperature: float, classes: int) -> None:
    logits, labels = synthetic(20000, classes, seed=classes)
    fitted = fit_temperature(logits * true_temperature, labels)  # overconfident when T > 1, under when < 1
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    assert negative_log_likelihood(logits * true_temperature, labels, fitted) <= negative_log_likelihood(
        logits * true_temperature, labels
    )


def test_a_perfectly_separated_set_stops_at_the_lower_bound() -> None:
    logits = torch.tensor([[3.0, -3.0], [-3.0, 3.0]] * 20)
    labels = torch.tensor([0, 1] * 20)
    assert fit_temperature(logits, labels) == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)


def test_ece_is_near_zero_for_a_calibrated_set_and_large_for_an_overconfident_one() -> None:
    logits, labels = synthetic(50000, 2, seed=7)
    calibrated = calibration(labels.numpy(), torch.softmax(logits, dim=1).numpy())
    overconfident = calibration(labels.numpy(), torch.softmax(logits * 3, dim=1).numpy())
    assert calibrated["bins"] == 15
    assert calibrated["ece"] < 0.01
    assert overconfident["ece"] > 0.05


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A small net with a dropout head (an untrained torchvision net's logits are all ~0)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(6), torch.nn.Flatten(), torch.nn.Linear(108, 64), torch.nn.ReLU(),
        torch.nn.Dropout(0.3), torch.nn.Linear(64, 2),
    ).eval()  # fmt: skip


def images(model: torch.nn.Module, n: int, seed: int) -> LabelledImages:
    """Random images labelled as the model answers them, every fifth one wrongly: a model to calibrate."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 1, 48, 48), generator=generator, dtype=torch.uint8)
    with torch.inference_mode():
        answered = model(normalize(pixels, SPEC)).argmax(dim=1) if n else torch.zeros(0, dtype=torch.long)
    labels = torch.where(torch.arange(n) % 5 == 0, 1 - answered, answered)
    return LabelledImages(pixels, labels, ["NORMAL", "PNEUMONIA"], [str(i) for i in range(n)])


def test_calibrate_records_the_temperature_and_a_threshold_that_flags_a_tenth_of_validation(model) -> None:
    sections = calibrate(model, images(model, 60, seed=1), SPEC, torch.device("cpu"))
    record, uncertainty = sections["calibration"], sections["uncertainty"]
    assert record["method"] == "temperature" and record["fitted_on"] == "validation" and record["n"] == 60
    assert TEMPERATURE_BOUNDS[0] <= record["temperature"] <= TEMPERATURE_BOUNDS[1]
    assert record["nll_after"] <= record["nll_before"] + 1e-9
    assert {"ece_before", "ece_after"} <= set(record)
    assert uncertainty["method"] == "mc_dropout" and uncertainty["samples"] > 1
    assert uncertainty["chosen_on"] == "validation" and 0 <= uncertainty["threshold"] <= 1
    flagged = uncertainty["validation"]["flagged"]
    assert flagged == pytest.approx(FLAGGED_SHARE * 60, abs=2)


def test_without_validation_images_the_card_says_why(model) -> None:
    sections = calibrate(model, images(model, 0, seed=1), SPEC, torch.device("cpu"))
    assert sections["calibration"]["method"] is None and "No validation images" in sections["calibration"]["reason"]
    assert "threshold" not in sections["uncertainty"]


def test_the_evaluation_report_sees_the_probabilities_the_worker_serves(model) -> None:
    """The trainer's evaluation and the worker's forward give the same calibrated probabilities."""
    card = calibrate(model, images(model, 40, seed=2), SPEC, torch.device("cpu"))
    evaluation_images = images(model, 12, seed=3)
    probabilities, figures, flags = calibrated_evaluation(model, evaluation_images, SPEC, torch.device("cpu"), card)
    loaded = LoadedModel(
        id="v", name="m", version=1, classes=["NORMAL", "PNEUMONIA"], spec=SPEC, module=model,
        device=torch.device("cpu"), intended_use={}, head=Head(model), card=card,
    )  # fmt: skip
    served = _probabilities(loaded, list(evaluation_images.pixels))
    assert np.allclose([output.probabilities for output in served], probabilities, atol=1e-5)
    assert all(output.calibrated for output in served)
    assert flags is not None and flags["threshold"] == card["uncertainty"]["threshold"]
    uncertain = sum(output.uncertainty > flags["threshold"] for output in served)
    assert uncertain == flags["flagged"]
    assert figures["calibrated"] is True and figures["temperature"] == card["calibration"]["temperature"]
    assert figures["before"]["ece"] is not None and figures["ece"] is not None


def test_the_reliability_plot_is_among_the_version_plots() -> None:
    logits, labels = synthetic(500, 2, seed=3)
    report = {
        "confusion_matrix": [[200, 50], [50, 200]], "classes": ["a", "b"], "accuracy": 0.8, "n": 500,
        "roc_auc": 0.9,
        "calibration": {
            **calibration(labels.numpy(), torch.softmax(logits, dim=1).numpy()), "temperature": 1.7,
            "before": calibration(labels.numpy(), torch.softmax(logits * 2, dim=1).numpy()),
        },
    }  # fmt: skip
    history = [{"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.8}]
    plots = render_plots(report, {}, history, "test")
    assert set(plots) == set(PLOT_NAMES) and "reliability.png" in plots
    assert plots["reliability.png"].startswith(b"\x89PNG")
