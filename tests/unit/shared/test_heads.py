"""The head tap: one pass gives the model's own logits and its features; dropout samples are fixed."""

from __future__ import annotations

import pytest
import torch

from shared.models.heads import Head
from shared.models.nets import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("architecture", "width", "sampled"),
    [("mobilenet_v3_small", 1024, True), ("resnet18", 512, False), ("squeezenet1_1", 512, False)],
)
def test_forward_gives_the_models_logits_and_its_features(architecture: str, width: int, sampled: bool) -> None:
    torch.manual_seed(0)
    model = build_model(architecture, 2).eval()
    head = Head(model)
    batch = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        outputs = head.forward(batch)
        expected = model(batch)
    assert torch.allclose(outputs.logits, expected, atol=1e-5)
    assert outputs.features.shape == (3, width)
    assert head.feature_width == width
    assert head.sampled is sampled


def test_dropout_samples_do_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 3).eval()
    head = Head(model, samples=8)
    images = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        alone = head.sample_logits(head.forward(images[:1]).features)
        together = head.sample_logits(head.forward(images).features)
    assert alone.shape == (1, 8, 3)
    assert together.shape == (4, 8, 3)
    assert torch.allclose(alone[0], together[0], atol=1e-4)
    assert together[0].std(dim=0).sum() > 0  # the masks differ: the samples spread


def test_dropout_samples_average_to_the_eval_logits() -> None:
    """Inverted dropout keeps the expectation: with many samples the head's mean approaches eval mode."""
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 2).eval()
    head = Head(model, samples=2000)
    with torch.inference_mode():
        outputs = head.forward(torch.randn(2, 3, 64, 64))
        mean = head.sample_logits(outputs.features).mean(dim=1)
    assert torch.allclose(mean, outputs.logits, atol=0.05 * outputs.logits.abs().max().item() + 1e-3)


def test_a_head_without_dropout_refuses_to_sample() -> None:
    head = Head(build_model("resnet18", 2).eval())
    with pytest.raises(ValueError):
        head.sample_logits(torch.zeros(1, 512))
