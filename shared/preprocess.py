"""The ONE preprocessing function: decoded image -> model input.

Training, evaluation and serving all call `preprocess` (or its two halves), driven by the
`PreprocessSpec` recorded in the model's card, so a served model never sees inputs scaled differently
from how it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels become a model input. Stored in every model card; the worker reads it back."""

    size: int = 224
    color: Literal["grayscale", "rgb"] = "grayscale"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    resize: Literal["stretch"] = "stretch"  # the training data is squashed to square; so is serving
    extra: dict[str, Any] = field(default_factory=dict)

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
        )


def to_model_pixels(array: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """Decoded float image -> uint8 CxHxW at the model's size and colour (no normalisation yet).

    Split from `normalize` so a training set can be held in memory compactly as uint8 and augmented
    before normalising; `preprocess` composes the two for serving.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if spec.color == "grayscale" and tensor.shape[0] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        tensor = (tensor * weights).sum(0, keepdim=True)
    elif spec.color == "rgb" and tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    tensor = F.interpolate(
        tensor.unsqueeze(0), size=(spec.size, spec.size), mode="bilinear", antialias=True, align_corners=False
    ).squeeze(0)
    return (tensor.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def normalize(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 [..., C, H, W] -> normalised float32 with 3 channels (grey is repeated: any torchvision net fits)."""
    x = pixels.float().div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    x = (x - mean) / std
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return x


def preprocess(array: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """The preprocessing function: decoded image -> model input tensor (3 x size x size)."""
    return normalize(to_model_pixels(array, spec), spec)
