"""How a version turns logits into answers: calibrated by its card's temperature, flagged by its threshold;
an older card without them still answers, uncalibrated and without uncertainty, and says why."""

from __future__ import annotations

import math

import pytest
import torch

from shared.models.answers import answers, calibrated_probabilities, predictive_uncertainty
from shared.models.calibration import (
    calibration_status,
    card_temperature,
    card_threshold,
    uncertain_warning,
    uncertainty_status,
)
from shared.models.heads import Head
from shared.models.nets import build_model

CALIBRATED_CARD = {
    "calibration": {"method": "temperature", "temperature": 2.0, "fitted_on": "validation"},
    "uncertainty": {"measure": "predictive_entropy", "threshold": 0.5},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sampled_head() -> Head:
    torch.manual_seed(0)
    return Head(build_model("mobilenet_v3_small", 3).eval())


def test_an_old_card_answers_its_plain_softmax_without_uncertainty_and_says_why(sampled_head) -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
    features = torch.randn(2, sampled_head.feature_width)
    served = answers(sampled_head, {"classes": ["a", "b", "c"]}, logits, features)
    assert torch.allclose(served.probabilities, torch.softmax(logits, dim=1))
    assert served.calibrated is False and served.uncertainty is None and served.threshold is None
    assert calibration_status({})["calibrated"] is False and "no calibration" in calibration_status({})["reason"]
    assert uncertainty_status({})["flags"] is False and "no uncertainty threshold" in uncertainty_status({})["reason"]


def test_a_calibrated_card_divides_the_logits_by_its_temperature_and_keeps_the_answer(sampled_head) -> None:
    torch.manual_seed(1)
    logits = torch.randn(50, 3) * 4
    served = answers(sampled_head, CALIBRATED_CARD, logits, torch.randn(50, sampled_head.feature_width))
    assert served.calibrated is True and served.threshold == 0.5
    assert torch.allclose(served.probabilities, torch.softmax(logits / 2.0, dim=1))
    assert torch.equal(served.probabilities.argmax(dim=1), logits.argmax(dim=1))
    # A temperature above 1 softens every answer: no answer is surer than before.
    assert (served.probabilities.max(dim=1).values <= torch.softmax(logits, dim=1).max(dim=1).values + 1e-6).all()
    assert served.uncertainty is not None and served.uncertainty.shape == (50,)
    assert ((served.uncertainty >= 0) & (served.uncertainty <= 1)).all()
    assert calibration_status(CALIBRATED_CARD) == {"calibrated": True, **CALIBRATED_CARD["calibration"]}


@pytest.mark.parametrize(
    ("card", "temperature", "threshold"),
    [
        ({"calibration": {"temperature": 1.5}, "uncertainty": {"threshold": 0.3}}, 1.5, 0.3),
        ({"calibration": {"method": None, "reason": "no validation images"}}, None, None),
        ({"calibration": {"temperature": "2"}, "uncertainty": {"threshold": True}}, None, None),
        ({"calibration": {"temperature": -1.0}, "uncertainty": {"threshold": 1.5}}, None, None),
        ({"calibration": {"temperature": math.nan}, "uncertainty": {"threshold": math.inf}}, None, None),
        ({"calibration": "temperature", "uncertainty": [0.2]}, None, None),
    ],
)
def test_only_a_usable_record_is_applied(card, temperature, threshold) -> None:
    assert card_temperature(card) == temperature
    assert card_threshold(card) == threshold


def test_a_record_without_a_temperature_gives_its_own_reason() -> None:
    status = calibration_status({"calibration": {"method": None, "reason": "no validation images"}})
    assert status == {"calibrated": False, "reason": "no validation images"}


def test_uncertainty_is_zero_when_sure_and_one_when_every_class_is_as_likely() -> None:
    head = Head(build_model("resnet18", 4).eval())  # no dropout: the calibrated softmax of the one pass
    assert not head.sampled
    logits = torch.tensor([[50.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 0.0, 0.0]])
    uncertainty = predictive_uncertainty(head, logits, torch.zeros(3, 512), temperature=None)
    assert uncertainty[0] == pytest.approx(0.0, abs=1e-6)
    assert uncertainty[1] == pytest.approx(1.0, abs=1e-6)
    assert 0.2 < uncertainty[2] < 0.9
    # A higher temperature spreads the distribution: more uncertain.
    assert predictive_uncertainty(head, logits, torch.zeros(3, 512), temperature=3.0)[2] > uncertainty[2]


def test_the_samples_of_a_dropout_head_are_averaged(sampled_head) -> None:
    torch.manual_seed(2)
    features = torch.randn(4, sampled_head.feature_width) * 3
    with torch.inference_mode():
        logits = sampled_head.rest(features)
        sampled = predictive_uncertainty(sampled_head, logits, features, temperature=1.0)
        mean = calibrated_probabilities(sampled_head.sample_logits(features), 1.0).mean(dim=1)
    entropy = -(mean * mean.log()).sum(dim=1) / math.log(3)
    assert torch.allclose(sampled, entropy, atol=1e-5)
    # Not the one pass's entropy: the samples spread.
    one_pass = calibrated_probabilities(logits, 1.0)
    assert not torch.allclose(sampled, -(one_pass * one_pass.log()).sum(dim=1) / math.log(3), atol=1e-4)


def test_the_warning_names_its_code_and_reads_as_a_sentence() -> None:
    warning = uncertain_warning(0.734, 0.41)
    assert warning["code"] == "uncertain"
    assert "0.73" in warning["detail"] and "0.41" in warning["detail"] and warning["detail"].endswith(".")
