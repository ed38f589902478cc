"""Training augmentation aimed at acquisition shift, on whole batches of uint8 model pixels.

What differs between two collections of radiographs is how they were taken and exported, not what
they show: framing (zoom, position, a little rotation and aspect), exposure and processing (brightness,
contrast, gamma), sharpness and noise. Each batch gets random draws of those, applied to the raw pixels
*before* the preprocessing's normalisation, so the model learns from what the normalisation leaves of
a shift rather than from a shift it never sees. No flips: anatomy is not mirror-symmetric.

Moderate on purpose: in the issue-13 spike a stronger policy (zoom to 1.3x, gamma +-0.4, frequent blur,
noise and resampling) cost validation AUC once CLAHE was in the preprocessing; zooming in stayed the
worst remaining corruption, so magnification is the geometry drawn most. All draws come from the
caller's generator (reproducible runs) and every operation works on the whole batch at once (a few
milliseconds per batch of 32 at 176 px on one CPU core).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ShiftAugmentation:
    rotation_degrees: float = 7.0
    translate: float = 0.05  # fraction of the side, each way
    magnification: tuple[float, float] = (1.0, 1.2)  # zoom in: the content fills more of the frame
    zoom_out_probability: float = 0.1
    zoom_out: tuple[float, float] = (0.85, 0.97)  # zoom out: a black border appears
    aspect: float = 0.08  # log-uniform aspect-ratio jitter
    brightness: float = 0.1  # added, +-, to [0, 1] intensities
    contrast: float = 0.2  # factor 1 +- this, about the image mean
    gamma: float = 0.3  # exponent exp(+- this): 0.74 to 1.35
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.002, 0.008)  # fraction of the side
    noise_probability: float = 0.2
    noise_std: float = 0.03

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 B x C x S x S -> an augmented uint8 batch of the same shape."""
        x = pixels.float().div_(255.0)
        x = self._geometry(x, generator)
        x = self._intensity(x, generator)
        x = self._blur(x, generator)
        x = self._noise(x, generator)
        return x.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)

    def _geometry(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = x.shape[0]
        angle = _uniform(batch, -self.rotation_degrees, self.rotation_degrees, generator) * math.pi / 180
        scale = _uniform(batch, *self.magnification, generator)
        zoom_out = torch.rand(batch, generator=generator) < self.zoom_out_probability
        scale = torch.where(zoom_out, _uniform(batch, *self.zoom_out, generator), scale)
        aspect = torch.exp(_uniform(batch, -self.aspect, self.aspect, generator)).sqrt()
        # Magnified images may move by the margin they gained, so every part of the image can be framed.
        room = (1 - 1 / scale).clamp(min=0) + 2 * self.translate
        shift_x, shift_y = (_uniform(batch, -1, 1, generator) * room for _ in range(2))
        scale_x, scale_y = 1 / (scale * aspect), aspect / scale
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([cos * scale_x, -sin * scale_y, shift_x], dim=1),
                torch.stack([sin * scale_x, cos * scale_y, shift_y], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _intensity(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = x.shape[0]
        gamma = torch.exp(_uniform(batch, -self.gamma, self.gamma, generator)).view(batch, 1, 1, 1)
        x = x.clamp(min=1e-4) ** gamma
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = (1 + _uniform(batch, -self.contrast, self.contrast, generator)).view(batch, 1, 1, 1)
        brightness = _uniform(batch, -self.brightness, self.brightness, generator).view(batch, 1, 1, 1)
        return (x - mean) * contrast + mean + brightness

    def _blur(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A separable Gaussian with its own sigma per image (sigma ~0: the image unchanged)."""
        batch, channels, height, width = x.shape
        chosen = torch.rand(batch, generator=generator) < self.blur_probability
        if not chosen.any():
            return x
        sigma = _uniform(batch, *self.blur_sigma, generator) * width
        sigma = torch.where(chosen, sigma, torch.full_like(sigma, 1e-3))
        radius = max(1, math.ceil(3 * float(sigma.max())))
        offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
        y = F.pad(x.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
        y = F.conv2d(y, kernel.view(batch * channels, 1, -1, 1), groups=batch * channels)
        y = F.conv2d(y, kernel.view(batch * channels, 1, 1, -1), groups=batch * channels)
        return y.reshape(x.shape)

    def _noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = x.shape[0]
        chosen = torch.rand(batch, generator=generator) < self.noise_probability
        std = torch.where(chosen, _uniform(batch, 0.0, self.noise_std, generator), torch.zeros(batch))
        return x + torch.randn(x.shape, generator=generator) * std.view(batch, 1, 1, 1)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low
