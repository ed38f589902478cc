"""Input-quality checks on real chest X-rays and on bad copies of them: each flag fires on its own defect only."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shared.imaging.decode import open_image
from shared.imaging.preprocess import PreprocessSpec, to_model_pixels
from shared.imaging.quality import check, colourfulness, mean_image, measure

MODEL_SIDE = 224


@pytest.fixture(scope="module")
def chest(chest_images) -> list[Image.Image]:
    paths = chest_images["NORMAL"][:6] + chest_images["PNEUMONIA"][:6]
    return [open_image(path.read_bytes()).convert("L") for path in paths]


@pytest.fixture(scope="module")
def template(chest_images) -> np.ndarray:
    spec = PreprocessSpec(size=64)
    paths = chest_images["NORMAL"][6:30] + chest_images["PNEUMONIA"][6:30]
    return mean_image(np.stack([to_model_pixels(open_image(p.read_bytes()), spec).numpy() for p in paths]))


def codes(image: Image.Image, template: np.ndarray | None = None, side: int = MODEL_SIDE) -> list[str]:
    return [flag.code for flag in check(measure(image, template), side)]


def remapped(image: Image.Image, low: float, high: float) -> Image.Image:
    """The image's grey levels squeezed into [low, high]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return Image.fromarray(np.clip(np.rint((low + array * (high - low)) * 255), 0, 255).astype(np.uint8))


def test_real_chest_images_are_not_flagged(chest, template) -> None:
    for image in chest:
        assert codes(image, template) == []


@pytest.mark.parametrize(
    ("low", "high", "code"),
    [
        (0.0, 0.25, "underexposed"),
        (0.75, 1.0, "overexposed"),
        (0.45, 0.6, "low_contrast"),
        (0.5, 0.505, "nearly_blank"),
    ],
)
def test_exposure_and_contrast(chest, low: float, high: float, code: str) -> None:
    for image in chest:
        assert codes(remapped(image, low, high)) == [code]


def test_a_uniform_image_is_nearly_blank_only(template) -> None:
    grey = np.full((300, 300), 128, dtype=np.uint8)
    assert codes(Image.fromarray(grey), template) == ["nearly_blank"]


def test_an_image_smaller_than_half_the_models_side_is_too_small(chest) -> None:
    small = chest[0].resize((100, 100), Image.Resampling.BOX)
    assert codes(small) == ["too_small"]
    assert codes(chest[0].resize((120, 120), Image.Resampling.BOX)) == []


# Lanczos is not among them: its ringing reads as detail at 4 pixels, and 4 of these 12 images enlarged
# 4x by it are found enlarged 2x only (see UPSCALE_RESIDUALS).
@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC])
def test_an_enlarged_thumbnail_is_upscaled(chest, resample) -> None:
    for image in chest:
        thumbnail = image.resize((56, 56), Image.Resampling.BOX)
        assert codes(thumbnail.resize((224, 224), resample)) == ["upscaled"]
        # Enlarged from 112, its detail is still half the model's side: not flagged.
        assert codes(image.resize((448, 448), resample)) == []


def test_an_inverted_radiograph_is_flagged_against_the_training_template(chest, template) -> None:
    for image in chest:
        negative = Image.fromarray(255 - np.asarray(image))
        assert codes(negative, template) == ["inverted_polarity"]
        assert codes(negative) == []  # no template (a version without a reference): not checked


def test_colourfulness_is_zero_for_grey_and_high_for_a_colour_photograph(chest, photograph) -> None:
    assert colourfulness(chest[0]) == 0.0
    assert colourfulness(chest[0].convert("RGB")) == 0.0
    assert colourfulness(photograph) > 0.3


def test_a_dicom_chest_radiograph_is_not_flagged(data_dir, template) -> None:
    image = open_image((data_dir / "dicom" / "RG1_UNCR.dcm").read_bytes())  # MONOCHROME1, shown as bone-bright
    assert codes(image, template) == []
