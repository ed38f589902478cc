"""What a version's card says about its calibration and uncertainty, read the same way everywhere.

The trainer fits both on the validation split (`services.trainer.calibration`) and records them as
`card["calibration"]` (the temperature T its logits are divided by) and `card["uncertainty"]` (the
threshold above which a result is flagged `uncertain`); serving applies them (`shared.models.answers`).
A card without them (a version registered before they existed, or one imported) still serves: its plain
softmax (T = 1, `calibrated: false`) and no uncertainty, and the version view says why.

No torch here: the gateway shows these records without loading a model.
"""

from __future__ import annotations

import math
from typing import Any

# The range a fitted temperature may take: beyond it, a validation set is too small or too easy to say
# anything (a perfectly separated one drives the fit towards T = 0).
TEMPERATURE_BOUNDS = (0.05, 20.0)
UNCALIBRATED_REASON = (
    "This version's card records no calibration (registered before calibration was fitted, or imported "
    "without one): results report its plain softmax probabilities (temperature 1) and `calibrated: false`."
)
NO_THRESHOLD_REASON = (
    "This version's card records no uncertainty threshold (registered before uncertainty was measured, "
    "or imported without one): results carry no `uncertainty` and no `uncertain` flag."
)


def card_temperature(card: dict[str, Any]) -> float | None:
    """The temperature the card records, or None when it records none (or none usable)."""
    low, high = TEMPERATURE_BOUNDS
    return _number(card, "calibration", "temperature", low, high)


def card_threshold(card: dict[str, Any]) -> float | None:
    """The uncertainty above which a result is flagged, or None when the card records none."""
    return _number(card, "uncertainty", "threshold", 0.0, 1.0)


def calibration_status(card: dict[str, Any]) -> dict[str, Any]:
    """What the version view shows: the card's calibration record, or why there is none."""
    return _status(card, "calibration", "calibrated", card_temperature(card) is not None, UNCALIBRATED_REASON)


def uncertainty_status(card: dict[str, Any]) -> dict[str, Any]:
    """What the version view shows: the card's uncertainty record, or why results have none."""
    return _status(card, "uncertainty", "flags", card_threshold(card) is not None, NO_THRESHOLD_REASON)


def uncertain_warning(uncertainty: float, threshold: float) -> dict[str, str]:
    """The entry of a result's `warnings` list when it is flagged uncertain."""
    return {
        "code": "uncertain",
        "detail": f"Uncertain answer (uncertainty {uncertainty:.2f}, threshold {threshold:.2f}): "
        "have a person read this image.",
    }


def _number(card: dict[str, Any], section: str, key: str, low: float, high: float) -> float | None:
    record = card.get(section)
    value = record.get(key) if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value) if low <= value <= high else None


def _status(card: dict[str, Any], section: str, flag: str, usable: bool, default_reason: str) -> dict[str, Any]:
    record = card.get(section)
    if usable and isinstance(record, dict):
        return {flag: True, **record}
    reason = record.get("reason") if isinstance(record, dict) else None
    return {flag: False, "reason": reason or default_reason}
