"""Input-quality checks: is this decoded image one a model can be asked about at all?

Pure functions of the decoded image (and, for polarity, of the training set's mean image): exposure,
contrast, blankness, resolution (the file's own size, and the detail it really holds: an enlarged
thumbnail has no fine detail however many pixels it has) and inverted polarity. Each finding is a flag
-- a machine-readable code and a sentence -- that travels with the result; none stops the model from
answering. `measure` also gives the image's colourfulness, which the out-of-distribution check compares
with the training set's (`shared.models.ood`).

Thresholds were measured on all 5,216 images of `chest-xray-224/train` (none is flagged at a model
size of 224 or less), the DICOM radiographs of the shared data, and synthetic bad inputs (numbers
beside each threshold; tests in `tests/unit/shared/test_quality.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.imaging.decode import to_float_array

# Exposure and contrast, on intensities in [0, 1] as a viewer shows them (1st/99th percentiles).
DARK_P99 = 0.30  # nothing in the image is brighter than this: underexposed (chest train: p99 >= 0.514)
BRIGHT_P1 = 0.68  # nothing is darker than this: overexposed (chest train: p1 <= 0.635, one image above 0.2)
LOW_CONTRAST_SPREAD = 0.20  # p99 - p1 below this: a flat image (chest train: spread >= 0.333)
BLANK_SPREAD = 0.02  # p99 - p1 below this: nearly blank (about 5 grey levels of 255)
# Resolution: the model enlarges anything smaller than this fraction of its input side.
MIN_SIDE_FRACTION = 0.5
# factor f -> the change (RMS, relative to the image's contrast) below which shrinking the image f times
# and enlarging it back loses nothing: it holds no detail finer than f pixels. Measured: chest train at
# 224 px, smallest change 0.025 / 0.048 / 0.055 for f = 2 / 3 / 4; chest images enlarged f times
# (bilinear, bicubic, Lanczos), largest 0.019 / 0.037 / 0.036. Larger factors are not tried: the same
# thresholds there also pass soft images enlarged only twice. So enlargement is found up to 4x; Lanczos
# ringing (up to 0.054 at f = 4) and JPEG recompression of an enlarged image (its blocks add fine
# "detail") can hide part of it.
UPSCALE_RESIDUALS = {2: 0.022, 3: 0.042, 4: 0.045}
UPSCALE_WINDOW = 512  # the central crop the resampling test runs on: its cost does not grow with the file
# Polarity: correlation of the image (16 x 16) with the training set's mean image. Chest train against
# a 64 px model's template: min +0.23, 1st percentile +0.54, so the same images inverted are below -0.5
# 99% of the time. A radiograph framed unlike the training images correlates weakly either way (the
# adult CR RG1: +0.18), so its inversion goes unseen; an extremity (RG3) correlates -0.53.
TEMPLATE_SIDE = 16
INVERTED_CORRELATION = -0.5
WORKING_SIDE = 256


@dataclass(frozen=True)
class Flag:
    code: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "detail": self.detail}


@dataclass(frozen=True)
class Measurements:
    """What the checks look at, kept apart from the thresholds so each can be measured and tested."""

    width: int
    height: int
    p1: float
    p99: float
    chroma_p90: float  # the 90th percentile of a pixel's chroma (max - min channel), in [0, 1]
    upscale_factor: int  # the largest factor the image can be shrunk by without losing detail (1: none)
    polarity: float | None  # correlation with the training mean image; None without one


def measure(image: Image.Image, template: np.ndarray | None = None) -> Measurements:
    """The measurements of one decoded image (any mode `open_image` returns)."""
    width, height = image.size
    working = image.copy()
    working.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BILINEAR)
    array = to_float_array(working)
    grey = luminance(array)
    p1, p99 = (float(v) for v in np.quantile(grey, (0.01, 0.99)))
    return Measurements(
        width=width,
        height=height,
        p1=p1,
        p99=p99,
        chroma_p90=_chroma(array),
        upscale_factor=upscale_factor(image),
        polarity=polarity(grey, template) if template is not None else None,
    )


def check(measured: Measurements, model_side: int) -> list[Flag]:
    """The flags for an image measured by `measure`, for a model that reads `model_side` pixels."""
    flags: list[Flag] = []
    spread = measured.p99 - measured.p1
    if spread < BLANK_SPREAD:
        flags.append(Flag("nearly_blank", "The image is nearly uniform: there is almost nothing in it to read."))
    elif measured.p99 < DARK_P99:
        flags.append(Flag("underexposed", "The image is very dark: nothing in it is brighter than dark grey."))
    elif measured.p1 > BRIGHT_P1:
        flags.append(Flag("overexposed", "The image is very bright: nothing in it is darker than light grey."))
    elif spread < LOW_CONTRAST_SPREAD:
        flags.append(Flag("low_contrast", "The image has very low contrast: its grey levels span a narrow range."))
    side = min(measured.width, measured.height)
    if side < MIN_SIDE_FRACTION * model_side:
        flags.append(
            Flag(
                "too_small",
                f"The image is {measured.width}x{measured.height} pixels; the model reads {model_side}x{model_side}, "
                "so it is enlarged and fine detail is missing.",
            )
        )
    elif side / measured.upscale_factor < MIN_SIDE_FRACTION * model_side:
        flags.append(
            Flag(
                "upscaled",
                f"The image holds no detail finer than about {measured.upscale_factor} pixels (it was enlarged "
                f"or blurred): about {side // measured.upscale_factor} pixels of detail across, less than half "
                f"the model's {model_side}.",
            )
        )
    blank = any(flag.code == "nearly_blank" for flag in flags)
    if measured.polarity is not None and measured.polarity < INVERTED_CORRELATION and not blank:
        flags.append(
            Flag(
                "inverted_polarity",
                "The image looks like a negative of the training images (what is dark there is bright here): "
                "check the photometric interpretation.",
            )
        )
    return flags


def colourfulness(image: Image.Image) -> float:
    """`Measurements.chroma_p90` of a decoded image on its own (0 for a grey one)."""
    working = image.copy()
    working.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BILINEAR)
    return _chroma(to_float_array(working))


def _chroma(array: np.ndarray) -> float:
    return float(np.quantile(array.max(axis=2) - array.min(axis=2), 0.9)) if array.ndim == 3 else 0.0


def luminance(array: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an HxWx3 array; a grey HxW array as it is."""
    if array.ndim == 2:
        return array
    return array[..., 0] * 0.299 + array[..., 1] * 0.587 + array[..., 2] * 0.114


def upscale_factor(image: Image.Image) -> int:
    """The largest factor of `UPSCALE_RESIDUALS` that the image's central window can be shrunk by and
    enlarged back with almost no change: an image enlarged k times holds nothing finer than k pixels."""
    width, height = image.size
    left, top = max(0, (width - UPSCALE_WINDOW) // 2), max(0, (height - UPSCALE_WINDOW) // 2)
    window = image.crop((left, top, min(width, left + UPSCALE_WINDOW), min(height, top + UPSCALE_WINDOW)))
    grey = luminance(to_float_array(window)).astype(np.float32)
    contrast = float(grey.std())
    if contrast < 1e-3:
        return 1
    source = Image.fromarray(grey, mode="F")
    found = 1
    for factor, limit in UPSCALE_RESIDUALS.items():
        small = (max(1, grey.shape[1] // factor), max(1, grey.shape[0] // factor))
        if min(small) < 8:
            break
        restored = source.resize(small, Image.Resampling.BOX).resize(source.size, Image.Resampling.BICUBIC)
        residual = float(np.sqrt(np.mean((np.asarray(restored) - grey) ** 2))) / contrast
        if residual < limit:
            found = factor
        elif factor == 2:
            break  # detail at 2 pixels: not enlarged (a factor that does not divide the enlargement can miss)
    return found


def polarity(grey: np.ndarray, template: np.ndarray) -> float:
    """Correlation of the image, reduced to the template's size, with the template (both standardised)."""
    side = template.shape[-1]
    small = np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BOX))
    return correlation(small, template)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def mean_image(pixels: np.ndarray, side: int = TEMPLATE_SIDE) -> np.ndarray:
    """The training set's mean image for `polarity`: uint8 N x C x S x S model pixels -> side x side float32."""
    grey = pixels.astype(np.float32).mean(axis=1) / 255.0  # N x S x S
    total = np.zeros((side, side), dtype=np.float64)
    for image in grey:
        total += np.asarray(Image.fromarray(image, mode="F").resize((side, side), Image.Resampling.BOX))
    return (total / max(len(grey), 1)).astype(np.float32)
