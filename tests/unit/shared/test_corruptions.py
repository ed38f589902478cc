"""The corruption suite: deterministic, shape-keeping, and harsher at each severity."""

from __future__ import annotations

import pytest
import torch

from shared.imaging.corruptions import CORRUPTIONS, SEVERITIES, Corruption, corrupt, suite


def radiograph_like(n: int = 4, size: int = 128, channels: int = 1) -> torch.Tensor:
    """Bright body with two darker lung fields and some texture: no corruption leaves it unchanged."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    body = 0.75 - 0.3 * (x**2 + y**2)
    lungs = 0.35 * (((x - 0.4) ** 2 / 0.1 + y**2 / 0.4) < 1) + 0.35 * (((x + 0.4) ** 2 / 0.1 + y**2 / 0.4) < 1)
    texture = 0.05 * torch.sin(17 * x) * torch.cos(13 * y)
    base = (body - lungs + texture).clamp(0, 1)
    images = torch.stack([base.roll(shifts=i, dims=1) for i in range(n)]).unsqueeze(1).expand(-1, channels, -1, -1)
    return (images * 255).round().to(torch.uint8).contiguous()


def test_the_suite_is_every_corruption_at_every_severity_in_a_fixed_order():
    corruptions = suite()
    assert len(corruptions) == len(CORRUPTIONS) * len(SEVERITIES)
    assert [c.key for c in corruptions][:3] == ["brightness_up@1", "brightness_up@2", "brightness_up@3"]
    assert suite(("jpeg",), (2,)) == [Corruption("jpeg", 2)]
    with pytest.raises(ValueError, match="unknown corruption"):
        suite(("sepia",))


@pytest.mark.parametrize("corruption", suite(), ids=lambda c: c.key)
def test_each_corruption_is_deterministic_keeps_shape_and_changes_the_image(corruption):
    pixels = radiograph_like()
    first, second = corrupt(pixels, corruption), corrupt(pixels.clone(), corruption)
    assert first.dtype == torch.uint8 and first.shape == pixels.shape
    assert torch.equal(first, second)
    assert (first.float() - pixels.float()).abs().mean() > 0.5


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_higher_severity_moves_the_image_further(name):
    pixels = radiograph_like()
    distances = [(corrupt(pixels, Corruption(name, s)).float() - pixels.float()).abs().mean() for s in SEVERITIES]
    assert distances[0] < distances[1] < distances[2]


def test_noise_depends_on_the_seed_not_on_global_random_state():
    pixels = radiograph_like()
    torch.manual_seed(1)
    a = corrupt(pixels, Corruption("noise", 2))
    torch.manual_seed(2)
    assert torch.equal(a, corrupt(pixels, Corruption("noise", 2)))
    assert not torch.equal(a, corrupt(pixels, Corruption("noise", 2), seed=1))


def test_colour_images_are_corrupted_per_channel_too():
    pixels = radiograph_like(channels=3)
    for corruption in (Corruption("jpeg", 3), Corruption("zoom_out", 2), Corruption("gamma_up", 1)):
        assert corrupt(pixels, corruption).shape == pixels.shape


def test_anything_but_uint8_batches_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        corrupt(radiograph_like().float(), Corruption("blur", 1))
    with pytest.raises(ValueError, match="uint8"):
        corrupt(radiograph_like()[0], Corruption("blur", 1))
