"""Calibrating a trained model on its validation split, and judging that calibration on the evaluation split.

Two things are fitted on validation and recorded in the card, which is what serving reads
(`shared.models.answers`):
- `calibration`: one temperature T that minimises the negative log-likelihood of softmax(logits / T)
  (temperature scaling, Guo et al. 2017). It never changes an answer, only how sure the answer says it is.
- `uncertainty`: the threshold above which a result is flagged `uncertain`: the uncertainty of the
  `FLAGGED_SHARE` most uncertain validation results (a fixed coverage: the share a site should expect
  to review on data like the validation split, and more on data unlike it). The validation errors the
  flag catches are recorded beside it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.trainer.data import LabelledImages
from services.trainer.evaluation import calibration
from shared.imaging.preprocess import PreprocessSpec, normalize
from shared.models.answers import answers, predictive_uncertainty, uncertainty_method
from shared.models.calibration import TEMPERATURE_BOUNDS, card_temperature
from shared.models.heads import Head, HeadOutputs

FLAGGED_SHARE = 0.10
THRESHOLD_CHOICE = "the uncertainty of the 10 % most uncertain validation results (fixed coverage)"


@torch.inference_mode()
def head_outputs(
    head: Head, images: LabelledImages, spec: PreprocessSpec, device: torch.device, batch_size: int = 128
) -> HeadOutputs:
    """The logits and head features of every image, in eval mode, on the CPU."""
    head.module.eval()
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        outputs = head.forward(normalize(images.pixels[start : start + batch_size], spec).to(device))
        logits.append(outputs.logits.cpu())
        features.append(outputs.features.cpu())
    if not logits:
        return HeadOutputs(torch.zeros(0, len(images.classes)), torch.zeros(0, head.feature_width))
    return HeadOutputs(torch.cat(logits), torch.cat(features))


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """The mean NLL (nats) of softmax(logits / T) on the true labels."""
    return float(F.cross_entropy(logits.double() / temperature, labels.long()).item())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 100) -> float:
    """The T within `TEMPERATURE_BOUNDS` that minimises the NLL: a golden-section search on log T.

    The NLL is convex in 1/T (a log-sum-exp of a linear function, minus a linear one), so it has one
    minimum along log T and the bracketing search finds it, at a bound when the data push it there.
    """
    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_temperature: float) -> float:
        return negative_log_likelihood(logits, labels, math.exp(log_temperature))

    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    loss_c, loss_d = loss(c), loss(d)
    for _ in range(iterations):
        if loss_c <= loss_d:
            b, d, loss_d = d, c, loss_c
            c = b - ratio * (b - a)
            loss_c = loss(c)
        else:
            a, c, loss_c = c, d, loss_d
            d = a + ratio * (b - a)
            loss_d = loss(d)
    return math.exp((a + b) / 2)


def flag_figures(uncertainty: np.ndarray, correct: np.ndarray, threshold: float) -> dict[str, Any]:
    """How many results the flag raises on a labelled set, and how many of the errors it catches."""
    flagged = uncertainty > threshold
    errors = ~correct

    def rate(part: np.ndarray) -> float | None:
        return float(errors[part].mean()) if part.any() else None

    return {
        "n": int(len(correct)),
        "flagged": int(flagged.sum()),
        "flagged_share": float(flagged.mean()) if len(correct) else None,
        "errors": int(errors.sum()),
        "errors_flagged": int((errors & flagged).sum()),
        "error_rate_flagged": rate(flagged),
        "error_rate_unflagged": rate(~flagged),
    }


def calibrate(model: torch.nn.Module, val: LabelledImages, spec: PreprocessSpec, device: torch.device) -> dict:
    """The card's `calibration` and `uncertainty` sections, fitted on the validation images."""
    head = Head(model)
    method = uncertainty_method(head)
    if len(val) == 0:
        reason = "No validation images to fit on: results report uncalibrated probabilities and no uncertainty."
        return {"calibration": {"method": None, "reason": reason}, "uncertainty": {**method, "reason": reason}}
    outputs = head_outputs(head, val, spec, device)
    labels = val.labels
    temperature = fit_temperature(outputs.logits, labels)
    label_array = labels.numpy()
    before = calibration(label_array, F.softmax(outputs.logits, dim=1).numpy())
    after = calibration(label_array, F.softmax(outputs.logits / temperature, dim=1).numpy())
    with torch.inference_mode():
        uncertainty = predictive_uncertainty(head, outputs.logits, outputs.features, temperature).numpy()
    threshold = float(np.quantile(uncertainty, 1 - FLAGGED_SHARE))
    correct = outputs.logits.argmax(dim=1).numpy() == label_array
    return {
        "calibration": {
            "method": "temperature",
            "temperature": round(temperature, 6),
            "fitted_on": "validation",
            "n": len(val),
            "bounds": list(TEMPERATURE_BOUNDS),
            "ece_before": before["ece"],
            "ece_after": after["ece"],
            "nll_before": negative_log_likelihood(outputs.logits, labels),
            "nll_after": negative_log_likelihood(outputs.logits, labels, temperature),
            "ece_bins": before["bins"],
        },
        "uncertainty": {
            **method,
            "threshold": round(threshold, 6),
            "chosen": THRESHOLD_CHOICE,
            "chosen_on": "validation",
            "flagged_share": FLAGGED_SHARE,
            "validation": flag_figures(uncertainty, correct, threshold),
        },
    }


def calibrated_evaluation(
    model: torch.nn.Module, images: LabelledImages, spec: PreprocessSpec, device: torch.device, card: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any], dict[str, Any] | None]:
    """The evaluation images as the version will serve them, given its card's calibration sections:
    their probabilities, the calibration before and after (ECE and NLL), and the flag's figures."""
    head = Head(model)
    outputs = head_outputs(head, images, spec, device)
    with torch.inference_mode():
        served = answers(head, card, outputs.logits, outputs.features)
    labels = images.labels.numpy()
    probabilities = served.probabilities.numpy()
    temperature = card_temperature(card)
    figures = {
        **calibration(labels, probabilities),
        "calibrated": served.calibrated,
        "temperature": temperature,
        "nll": negative_log_likelihood(outputs.logits, images.labels, temperature or 1.0) if len(images) else None,
        "before": {
            **calibration(labels, F.softmax(outputs.logits, dim=1).numpy()),
            "nll": negative_log_likelihood(outputs.logits, images.labels) if len(images) else None,
        },
    }
    flags = None
    if served.uncertainty is not None and served.threshold is not None:
        correct = probabilities.argmax(axis=1) == labels
        flags = {"threshold": served.threshold, **flag_figures(served.uncertainty.numpy(), correct, served.threshold)}
    return probabilities, figures, flags
