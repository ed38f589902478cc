"""What a version answers for a batch of logits: calibrated probabilities, and how uncertain each one is.

One function (`answers`) for the worker's results and the trainer's evaluation report, so the figures a
card quotes are of the probabilities, confidences and flags clients get.

Calibration: softmax(logits / T), T from the card (`shared.models.calibration`); dividing by one positive
number keeps every row's order, so the answered label never changes.

Uncertainty: the predictive entropy of the *calibrated* distribution, divided by log(classes) so it lies
in [0, 1] for any label set (0: all mass on one class; 1: every class equally likely). Where the head has
a dropout (`Head.sampled`), that distribution is the mean over the head's fixed Monte Carlo dropout
masks; otherwise (ResNet, DenseNet, ...) the calibrated softmax of the one pass -- the same measure
without the dropout spread, so every architecture gets an uncertainty and a flag, and the card says which.
Why the entropy and not the mutual information (the samples' disagreement alone) or the spread of the
answered class: the flag is there to catch results likely to be wrong, whatever the cause. The entropy
of the mean counts both the samples' disagreement (the model does not know) and calibrated class
overlap (the image is ambiguous); the mutual information misses an image all samples agree is a coin toss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from shared.models.calibration import card_temperature, card_threshold
from shared.models.heads import Head

MEASURE = "predictive_entropy"


def calibrated_probabilities(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """softmax(logits / T) over the last dimension; T = None: uncalibrated (T = 1)."""
    return torch.softmax(logits.float() / (temperature or 1.0), dim=-1)


def predictive_uncertainty(
    head: Head, logits: torch.Tensor, features: torch.Tensor, temperature: float | None
) -> torch.Tensor:
    """N values in [0, 1]: the normalised entropy of the calibrated (dropout-averaged) distribution."""
    if head.sampled:
        probabilities = calibrated_probabilities(head.sample_logits(features), temperature).mean(dim=1)
    else:
        probabilities = calibrated_probabilities(logits, temperature)
    classes = probabilities.shape[-1]
    if classes < 2:
        return probabilities.new_zeros(probabilities.shape[0])
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1)
    return (entropy / math.log(classes)).clamp(0.0, 1.0)


def uncertainty_method(head: Head) -> dict[str, Any]:
    """How `predictive_uncertainty` works for this head, as the card records it."""
    if head.sampled:
        return {"measure": MEASURE, "method": "mc_dropout", "samples": head.samples, "dropout": head.dropout_p}
    return {
        "measure": MEASURE,
        "method": "softmax",
        "samples": 1,
        "note": "the head has no dropout before its output layer: the entropy of the calibrated softmax of "
        "one pass, without Monte Carlo samples",
    }


@dataclass
class Answers:
    """A batch's answers as a version serves them."""

    probabilities: torch.Tensor  # N x classes, calibrated when `calibrated`
    calibrated: bool
    uncertainty: torch.Tensor | None  # N, in [0, 1]; None when the card has no threshold to judge it by
    threshold: float | None


def answers(head: Head, card: dict[str, Any], logits: torch.Tensor, features: torch.Tensor) -> Answers:
    """What the version whose card is `card` answers for these logits and the features its head saw."""
    temperature = card_temperature(card)
    threshold = card_threshold(card)
    return Answers(
        probabilities=calibrated_probabilities(logits, temperature),
        calibrated=temperature is not None,
        uncertainty=predictive_uncertainty(head, logits, features, temperature) if threshold is not None else None,
        threshold=threshold,
    )
