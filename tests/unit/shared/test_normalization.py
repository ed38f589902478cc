"""The preprocessing's normalisation modes: old cards keep "fixed"; CLAHE + standardisation absorbs
global intensity shifts of the input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from shared.imaging.corruptions import Corruption, corrupt
from shared.imaging.preprocess import PreprocessSpec, normalize, preprocess, to_model_pixels

# A card's "preprocessing" as every version registered before normalisation modes existed has it.
OLD_CARD = {"size": 64, "color": "grayscale", "mean": [0.5], "std": [0.25], "resize": "stretch", "extra": {}}


def test_a_card_without_normalisation_loads_as_fixed_and_normalises_as_before():
    spec = PreprocessSpec.from_dict(OLD_CARD)
    assert spec.normalization == "fixed"
    pixels = torch.arange(64 * 64, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, 1, 64, 64)
    expected = ((pixels.float() / 255.0 - 0.5) / 0.25).expand(1, 3, 64, 64)
    assert torch.equal(normalize(pixels, spec), expected)


def test_a_clahe_spec_round_trips_through_a_card():
    spec = PreprocessSpec(size=96, normalization="clahe_standardize", clahe_tiles=8, clahe_clip_limit=2.0)
    card = spec.to_dict()
    assert card["normalization"] == "clahe_standardize" and card["clahe_tiles"] == 8
    assert PreprocessSpec.from_dict(card) == spec


@pytest.fixture(scope="module")
def chest_pixels(chest_images: dict[str, list[Path]]) -> torch.Tensor:
    spec = PreprocessSpec(size=128)
    files = chest_images["NORMAL"][:4] + chest_images["PNEUMONIA"][:4]
    return torch.stack([to_model_pixels(Image.open(path), spec) for path in files])


@pytest.mark.parametrize(
    "shift", [Corruption("gamma_down", 1), Corruption("gamma_up", 1), Corruption("contrast_down", 1)]
)
def test_clahe_standardisation_absorbs_a_global_gamma_or_contrast_change(chest_pixels, shift):
    shifted = corrupt(chest_pixels, shift)
    fixed = PreprocessSpec(size=128)
    equalised = PreprocessSpec(size=128, normalization="clahe_standardize")

    def moved(spec: PreprocessSpec) -> float:
        return float((normalize(shifted, spec) - normalize(chest_pixels, spec)).abs().mean())

    # Measured on these images: fixed moves 0.20-0.24 std units, CLAHE 0.05-0.06.
    assert moved(equalised) < 0.1
    assert moved(equalised) < 0.4 * moved(fixed)


def test_clahe_standardised_images_have_mean_0_and_std_1_and_a_blank_one_stays_finite(chest_pixels):
    spec = PreprocessSpec(size=128, normalization="clahe_standardize")
    x = normalize(chest_pixels, spec)
    assert x.shape == (8, 3, 128, 128)
    assert x.mean(dim=(1, 2, 3)).abs().max() < 1e-4
    assert (x[:, 0].std(dim=(1, 2)) - 1).abs().max() < 1e-3
    blank = normalize(torch.full((1, 1, 128, 128), 200, dtype=torch.uint8), spec)
    assert torch.isfinite(blank).all() and blank.abs().max() < 1e-4


def test_colour_images_are_equalised_on_lightness_and_keep_their_shape():
    spec = PreprocessSpec(size=32, color="rgb", normalization="clahe_standardize")
    image = Image.new("RGB", (40, 40), (180, 40, 90))
    image.paste((60, 60, 200), (0, 0, 20, 40))
    x = preprocess(image, spec)
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    left, right = x[:, :, :12].mean(dim=(1, 2)), x[:, :, -12:].mean(dim=(1, 2))
    assert left[2] > left[0] and right[0] > right[2]  # blue stays bluer than red on the left, and red on the right
