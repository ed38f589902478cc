"""The ONE preprocessing function: decoded image -> model input.

Training, evaluation and serving all call `preprocess` (or its two halves), driven by the
`PreprocessSpec` recorded in the model's card, so a served model never sees inputs scaled differently
from how it was trained.

Two normalisations. "fixed" (every card from before the field existed): intensities scaled by a fixed
mean and std, so the model sees exposure, gamma and contrast as the scanner wrote them.
"clahe_standardize" (the recommended recipe's): contrast-limited adaptive histogram equalisation, then
each image standardised to mean 0 and std 1. Equalisation maps an image's grey levels through its own
local histograms, so a global gamma, contrast or brightness change of the input (another scanner's
processing) largely disappears before the model sees it: in the issue-13 spike it removed the
specificity collapse under intensity shifts at equal validation AUC (`research/shift-spike/`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# OpenCV's CLAHE rather than our own: a well-kept C++ implementation (tiled histograms, clipping,
# bilinear interpolation between tiles) that releases the GIL; with the standardisation, 0.4 ms per
# 176 px image on one core (measured on this machine).
import cv2
import numpy as np
import torch
from PIL import Image

from shared.imaging.decode import HIGH_DEPTH_MODES, to_float_array

Normalization = Literal["fixed", "clahe_standardize"]


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels become a model input. Stored in every model card; the worker reads it back."""

    size: int = 224
    color: Literal["grayscale", "rgb"] = "grayscale"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    resize: Literal["stretch"] = "stretch"  # the training data is squashed to square; so is serving
    extra: dict[str, Any] = field(default_factory=dict)
    # "fixed": (x - mean) / std. "clahe_standardize": CLAHE on the uint8 model pixels (tiles x tiles
    # grid, clip limit in multiples of a flat histogram's bin), then per-image standardisation; mean and
    # std are then unused.
    normalization: Normalization = "fixed"
    clahe_tiles: int = 4
    clahe_clip_limit: float = 3.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        return cls(
            size=int(data["size"]),
            color=data["color"],
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            resize=data.get("resize", "stretch"),
            extra=dict(data.get("extra", {})),
            # Cards written before normalisation modes existed were all "fixed".
            normalization=data.get("normalization", "fixed"),
            clahe_tiles=int(data.get("clahe_tiles", 4)),
            clahe_clip_limit=float(data.get("clahe_clip_limit", 3.0)),
        )


# The recommended recipe's normalisation (see the README): CLAHE then per-image standardisation.
RECIPE_NORMALIZATION: Normalization = "clahe_standardize"


def recipe_spec(size: int, color: str, normalization: Normalization = RECIPE_NORMALIZATION) -> PreprocessSpec:
    """xrayq's preprocessing at `size` px. "rgb" keeps colour, anything else ("grayscale", "auto") is
    grey. The mean/std are used by "fixed" normalisation (data-independent: X-ray intensities are
    spread around mid-grey); "clahe_standardize" standardises each image by its own statistics."""
    if color == "rgb":
        return PreprocessSpec(
            size=size, color="rgb", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), normalization=normalization
        )
    return PreprocessSpec(size=size, color="grayscale", mean=(0.5,), std=(0.25,), normalization=normalization)


def to_model_pixels(image: Image.Image | np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """A decoded image -> uint8 C x size x size in the model's colour (no normalisation yet).

    Colour conversion (ITU-R 601 luma for grey) and the antialiased bilinear resize run in Pillow's C
    code, which releases the GIL: the worker prepares a chunk's images in parallel threads. 16-bit
    images keep their precision until the final rounding. Split from `normalize` so a training set is
    held in memory compactly as uint8 and augmented before normalising.
    """
    if isinstance(image, np.ndarray):
        image = _from_array(image)
    if image.mode in HIGH_DEPTH_MODES:
        image = Image.fromarray(to_float_array(image) * np.float32(255.0), mode="F")
    elif spec.color == "grayscale":
        image = image.convert("L")
    else:
        image = image.convert("RGB")
    image = image.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    array = np.array(image)  # a writable copy: torch refuses to wrap read-only buffers
    if image.mode == "F":
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()
    if spec.color == "rgb" and tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1).contiguous()
    return tensor


def _from_array(array: np.ndarray) -> Image.Image:
    """uint8 arrays (as MedMNIST stores them) or floats in [0, 1] (as `decode_image` returns)."""
    if array.dtype != np.uint8:
        if array.ndim == 2:
            return Image.fromarray(np.asarray(array, dtype=np.float32) * np.float32(255.0), mode="F")
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


# A floor under the per-image std: a nearly blank image is not stretched into amplified noise.
MIN_IMAGE_STD = 0.02


def normalize(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 [..., C, H, W] -> normalised float32 with 3 channels (grey is repeated: any torchvision net fits)."""
    if spec.normalization == "clahe_standardize":
        x = equalize_contrast(pixels, spec).float().div_(255.0)
        mean = x.mean(dim=(-3, -2, -1), keepdim=True)
        std = x.std(dim=(-3, -2, -1), keepdim=True).clamp_min(MIN_IMAGE_STD)
        x = (x - mean) / std
    else:
        x = pixels.float().div_(255.0)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        x = (x - mean) / std
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return x


def equalize_contrast(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """CLAHE of uint8 [..., C, H, W] pixels, image by image (grey directly; colour on the L of CIELAB,
    so hues are kept)."""
    clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip_limit, tileGridSize=(spec.clahe_tiles, spec.clahe_tiles))
    images = pixels.reshape(-1, *pixels.shape[-3:]).contiguous().numpy()
    out = np.empty_like(images)
    for index, image in enumerate(images):
        if image.shape[0] == 1:
            out[index, 0] = clahe.apply(np.ascontiguousarray(image[0]))
        else:
            lab = cv2.cvtColor(np.ascontiguousarray(image.transpose(1, 2, 0)), cv2.COLOR_RGB2LAB)
            lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
            out[index] = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB).transpose(2, 0, 1)
    return torch.from_numpy(out).reshape(pixels.shape)


def preprocess(image: Image.Image | np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """The preprocessing function: decoded image -> model input tensor (3 x size x size)."""
    return normalize(to_model_pixels(image, spec), spec)
