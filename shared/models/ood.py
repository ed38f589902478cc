"""Out-of-distribution reference: is an input the kind of image a model version was trained on?

Each version registered by a training run carries a reference of its training set, stored beside its
weights as safetensors (`ood.safetensors`, never pickled) and described in `card["ood"]` (key, sha256,
method, threshold, and how the threshold was chosen). Two signals, both against the model's own training
set, so they work for any label set:

- **features**: the Mahalanobis distance of the image's features (the input of the model's last layer,
  `shared.models.heads`) from the training set's, with each feature standardised and a Ledoit-Wolf
  shrunk covariance (fitted by `services.trainer.ood_reference`), divided by the feature count. Its
  threshold is chosen on held-out images *and* scanner-like corrupted copies of them, so another
  hospital's radiographs are not flagged.
- **colour**: a model trained on greyscale images never sees colour (preprocessing makes every input
  grey), so its features cannot tell a stained cell smear from a radiograph; the image's colourfulness
  is compared with the most colourful training image instead.

The reference also keeps the training set's mean image, which `shared.imaging.quality` uses to detect
inverted polarity. A version without a reference (registered before references existed) serves without
these checks; `checks_of` says so in its card view.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shared.core.errors import XrayqError
from shared.core.storage import ObjectStore
from shared.imaging.quality import Flag

METHOD = "mahalanobis-standardised-ledoit-wolf"
FILE_NAME = "ood.safetensors"
CODE = "out_of_distribution"
# Colour that a greyscale training set cannot explain: the 90th percentile of a pixel's chroma (max -
# min channel) above this, or above 1.5x the most colourful training image. Measured: chest train 0.0
# (all 5,216 images: grey stays exactly grey through JPEG), the 16 malaria cell smears 0.055-0.29 (pale
# unstained ones are the lowest), a colour photograph 0.44.
MIN_COLOUR_LIMIT = 0.03


@dataclass
class OodReference:
    """A version's training set, as the out-of-distribution check needs it."""

    mean: torch.Tensor  # D: the training features' mean
    scale: torch.Tensor  # D: their standard deviation (each feature is standardised first)
    precision: torch.Tensor  # D x D: the inverse of the shrunk covariance of the standardised features
    threshold: float  # distances above this are flagged
    colour_limit: float  # chroma above this is flagged
    template: np.ndarray  # the training set's mean image (shared.imaging.quality.TEMPLATE_SIDE square)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """N x D features -> N distances (root of the squared Mahalanobis distance per feature)."""
        z = (features.double() - self.mean.double()) / self.scale.double()
        squared = ((z @ self.precision.double()) * z).sum(dim=1).clamp_min(0)
        return (squared / z.shape[1]).sqrt().float()

    def judge(self, distance: float, chroma: float | None) -> Flag | None:
        """The flag for one image: its feature distance and (when the image was measured) its chroma."""
        if chroma is not None and chroma > self.colour_limit:
            return Flag(
                CODE,
                f"The image is in colour (chroma {chroma:.2f}); the images the model was trained on are not "
                f"(at most {self.colour_limit:.2f}): it is not the kind of image the model was made for.",
            )
        if distance > self.threshold:
            return Flag(
                CODE,
                f"The image is unlike the images the model was trained on (feature distance {distance:.2f}, "
                f"threshold {self.threshold:.2f}): its answer may be meaningless.",
            )
        return None

    def to_bytes(self) -> bytes:
        return save_safetensors(
            {
                "mean": self.mean.float().contiguous(),
                "scale": self.scale.float().contiguous(),
                "precision": self.precision.float().contiguous(),
                "template": torch.from_numpy(np.ascontiguousarray(self.template, dtype=np.float32)),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, section: dict[str, Any]) -> OodReference:
        tensors = load_safetensors(data)
        return cls(
            mean=tensors["mean"],
            scale=tensors["scale"],
            precision=tensors["precision"],
            threshold=float(section["threshold"]),
            colour_limit=float(section["colour_limit"]),
            template=tensors["template"].numpy(),
        )


def load_reference(card: dict[str, Any], store: ObjectStore) -> OodReference | None:
    """The version's reference, checked against the sha256 its card records; None when it has none."""
    section = card.get("ood")
    if not isinstance(section, dict) or section.get("method") != METHOD:
        return None
    data = store.get(section["key"])
    if hashlib.sha256(data).hexdigest() != section["sha256"]:
        raise XrayqError(
            "model_corrupt",
            f"The out-of-distribution reference of {card.get('name')}@{card.get('version')} does not match its sha256.",
        )
    return OodReference.from_bytes(data, section)


def checks_of(card: dict[str, Any]) -> dict[str, str]:
    """Which checks a version's results get, and why one is missing: shown with the version."""
    checks = {"input_quality": "on: exposure, contrast, blank, resolution (every version)"}
    section = card.get("ood")
    if isinstance(section, dict) and section.get("method") == METHOD:
        checks["out_of_distribution"] = (
            f"on: {METHOD} distance of the model's features, threshold {section['threshold']:.3g}; "
            f"colour above {section['colour_limit']:.3g}"
        )
        checks["inverted_polarity"] = "on: correlation with the training set's mean image"
    else:
        reason = (
            "off: this version has no out-of-distribution reference (it was registered before references "
            "existed, or imported without one); train a new version to get it"
        )
        checks["out_of_distribution"] = reason
        checks["inverted_polarity"] = reason
    return checks
