"""Scanner-like corruptions of model pixels: the shift proxies every version is evaluated under.

A later collection of radiographs differs from the training images the way another scanner, another
exposure or another export path would: brighter or darker, flatter or harsher, a different gamma, softer,
noisier, resampled, recompressed, framed tighter or looser. Each corruption here imitates one of those, at
three severities, on uint8 model pixels (N x C x S x S, what `to_model_pixels` returns) *before* the
preprocessing's normalisation, so the normalisation has to absorb them as it would in service.

Deterministic: the same pixels, name and severity give the same output (noise draws from a generator
seeded with `seed` and the corruption's name, never from the global one). Sizes are relative to the
image side, so a severity means the same at 64 px and at 176 px.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

SEVERITIES = (1, 2, 3)

# name -> the parameter at severities 1, 2, 3. Chosen so that severity 1 is a plausible difference
# between two sites and severity 3 a bad but still readable image.
LEVELS: dict[str, tuple[float, float, float]] = {
    "brightness_up": (0.08, 0.15, 0.25),  # added to [0, 1] intensities
    "brightness_down": (0.08, 0.15, 0.25),  # subtracted
    "contrast_down": (0.75, 0.6, 0.45),  # factor about the image mean
    "contrast_up": (1.25, 1.5, 1.8),
    "gamma_down": (0.8, 0.6, 0.45),  # x ** gamma: lifts the mid-tones
    "gamma_up": (1.25, 1.6, 2.0),  # darkens them
    "blur": (0.005, 0.009, 0.015),  # Gaussian sigma, as a fraction of the side (0.9, 1.6, 2.6 px at 176)
    "noise": (0.02, 0.04, 0.07),  # Gaussian noise std, fraction of the full range
    "downscale_upscale": (0.5, 0.35, 0.25),  # resampled through this fraction of the side
    "jpeg": (40, 20, 10),  # JPEG quality of a recompression
    "zoom_in": (0.9, 0.8, 0.7),  # the central fraction of the image, enlarged back to full size
    "zoom_out": (0.9, 0.8, 0.7),  # the whole image shrunk to this fraction, framed by a black border
}
CORRUPTIONS = tuple(LEVELS)


@dataclass(frozen=True)
class Corruption:
    name: str
    severity: int

    @property
    def key(self) -> str:
        return f"{self.name}@{self.severity}"

    @property
    def level(self) -> float:
        return LEVELS[self.name][self.severity - 1]


def suite(names: tuple[str, ...] = CORRUPTIONS, severities: tuple[int, ...] = SEVERITIES) -> list[Corruption]:
    """Every named corruption at every severity, in a fixed order."""
    for name in names:
        if name not in LEVELS:
            raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return [Corruption(name, severity) for name in names for severity in severities]


def corrupt(pixels: torch.Tensor, corruption: Corruption, seed: int = 0) -> torch.Tensor:
    """uint8 N x C x S x S -> a corrupted uint8 copy of the same shape."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4:
        raise ValueError(f"expected uint8 N x C x H x W pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    if corruption.name == "jpeg":
        return _jpeg(pixels, int(corruption.level))
    x = pixels.float().div_(255.0)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(corruption.key.encode()))
    x = _FLOAT_OPS[corruption.name](x, corruption.level, generator)
    return x.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def _brightness_up(x: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    return x + level


def _brightness_down(x: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    return x - level


def _contrast(x: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    return (x - mean) * level + mean


def _gamma(x: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    return x.clamp(min=0.0) ** level


def _blur(x: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    sigma = level * x.shape[-1]
    kernel = 2 * int(np.ceil(3 * sigma)) + 1
    return TF.gaussian_blur(x, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def _noise(x: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    return x + torch.randn(x.shape, generator=generator) * level


def _downscale_upscale(x: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    height, width = x.shape[-2:]
    small = (max(2, round(height * level)), max(2, round(width * level)))
    down = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(height, width), mode="bilinear", align_corners=False)


def _zoom_in(x: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    height, width = x.shape[-2:]
    crop_h, crop_w = round(height * level), round(width * level)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    centre = x[..., top : top + crop_h, left : left + crop_w]
    return F.interpolate(centre, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def _zoom_out(x: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    height, width = x.shape[-2:]
    small_h, small_w = round(height * level), round(width * level)
    small = F.interpolate(x, size=(small_h, small_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (height - small_h) // 2, (width - small_w) // 2
    return F.pad(small, (left, width - small_w - left, top, height - small_h - top), value=0.0)


def _jpeg(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """Recompressed by Pillow's libjpeg, as an export or a PACS gateway would."""
    out = []
    for image in pixels.numpy():
        grey = image.shape[0] == 1
        buffer = io.BytesIO()
        Image.fromarray(image[0] if grey else image.transpose(1, 2, 0)).save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer).convert("L" if grey else "RGB"))
        out.append(decoded[None] if grey else decoded.transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


_FLOAT_OPS: dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "brightness_up": _brightness_up,
    "brightness_down": _brightness_down,
    "contrast_down": _contrast,
    "contrast_up": _contrast,
    "gamma_down": _gamma,
    "gamma_up": _gamma,
    "blur": _blur,
    "noise": _noise,
    "downscale_upscale": _downscale_upscale,
    "zoom_in": _zoom_in,
    "zoom_out": _zoom_out,
}
