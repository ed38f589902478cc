"""The training run's out-of-distribution reference (see `shared.models.ood`): fitted on the training
images' features, its threshold chosen on held-out images and corrupted copies of them.

Which score, measured (a mobilenet_v3_small trained at 64 px on 400 chest images per class; threshold
at the 99.5th percentile of 150 held-out images and their copies under the twelve corruptions of
`shared.imaging.corruptions` at severities 1-2): a Mahalanobis distance of standardised features with a
Ledoit-Wolf covariance put a photograph at 15x the threshold (class-agnostic on raw features 13x,
class-conditional 11-13x, 5-nearest-neighbour cosine 1.0-1.25x), with the same false-flag rates on the
corruptions. Severity-3 corruptions are reported, not used: a 0.7x shrunk image in a black frame looks
as foreign to such a small model as a photograph does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from services.trainer.data import STORED_MEMBER_LIMITS, LabelledImages
from shared.core.errors import XrayqError
from shared.imaging.corruptions import Corruption, corrupt, suite
from shared.imaging.decode import open_image
from shared.imaging.preprocess import PreprocessSpec, normalize
from shared.imaging.quality import colourfulness, mean_image
from shared.models.heads import Head
from shared.models.ood import FILE_NAME, METHOD, MIN_COLOUR_LIMIT, OodReference

MAX_FIT_IMAGES = 2000  # training images whose features are fitted (evenly spaced over the set)
MAX_HELD_OUT_IMAGES = 150  # held-out images whose copies are corrupted (each image x 36 copies)
THRESHOLD_SEVERITIES = (1, 2)
REPORTED_SEVERITIES = (1, 2, 3)
THRESHOLD_QUANTILE = 0.995
# Held-out images come from the training set's own collection; another hospital's radiographs sit
# further out. Measured on the 64 px model of tests/integration/test_result_flags.py: of 300 unseen chest
# images of the same collection one lay at 1.25x the quantile (the next at 0.84x), the photograph at 98x,
# a 0.7x image in a black frame at 1.3-38x. A 1.5x margin keeps radiographs unflagged and costs nothing
# against images that are not radiographs.
THRESHOLD_MARGIN = 1.5
COLOUR_SAMPLE = 64


@dataclass
class ReferenceArtifacts:
    section: dict[str, Any]  # card["ood"], without key and sha256 (register_version adds them)
    content: bytes  # the safetensors file

    def extra_card(self) -> dict[str, Any]:
        return {"ood": self.section}

    def attachments(self) -> dict[str, bytes]:
        return {FILE_NAME: self.content}


def build_reference(
    module: torch.nn.Module,
    spec: PreprocessSpec,
    train: LabelledImages,
    held_out: LabelledImages,
    train_reads: Sequence[Callable[[], bytes]],
    device: torch.device,
    beat: Callable[[], None] = lambda: None,
) -> ReferenceArtifacts:
    """The reference of a trained `module` (its features on `train`) and its threshold (on `held_out`)."""
    head = Head(module.eval().to(device))
    fit_on = _evenly(train.pixels, MAX_FIT_IMAGES)
    features = features_of(head, fit_on, spec, device).numpy().astype(np.float64)
    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-6 * (float(features.std(axis=0).mean()) + 1e-12)
    precision = LedoitWolf().fit((features - mean) / scale).precision_
    reference = OodReference(
        mean=torch.from_numpy(mean).float(),
        scale=torch.from_numpy(scale).float(),
        precision=torch.from_numpy(precision).float(),
        threshold=float("inf"),
        colour_limit=colour_limit(train_reads),
        template=mean_image(fit_on.numpy()),
    )
    beat()
    pixels = _evenly(held_out.pixels, MAX_HELD_OUT_IMAGES)
    clean = reference.distances(features_of(head, pixels, spec, device)).numpy()
    shifted: dict[Corruption, np.ndarray] = {}
    for corruption in suite(severities=REPORTED_SEVERITIES):
        shifted[corruption] = reference.distances(features_of(head, corrupt(pixels, corruption), spec, device)).numpy()
        beat()
    chosen_on = np.concatenate([clean, *(d for c, d in shifted.items() if c.severity in THRESHOLD_SEVERITIES)])
    reference.threshold = THRESHOLD_MARGIN * float(np.quantile(chosen_on, THRESHOLD_QUANTILE))
    section = {
        "method": METHOD,
        "file": FILE_NAME,
        "features": int(mean.shape[0]),
        "threshold": round(reference.threshold, 6),
        "colour_limit": round(reference.colour_limit, 6),
        "fitted_on": {"train_images": len(fit_on)},
        "threshold_chosen_on": {
            "held_out_images": len(pixels),
            "corruptions": sorted({c.name for c in suite()}),
            "severities": list(THRESHOLD_SEVERITIES),
            "quantile": THRESHOLD_QUANTILE,
            "margin": THRESHOLD_MARGIN,
        },
        "flagged": {
            "held_out": _rate(clean, reference.threshold),
            **{c.key: _rate(distances, reference.threshold) for c, distances in shifted.items()},
        },
    }
    return ReferenceArtifacts(section, reference.to_bytes())


@torch.inference_mode()
def features_of(
    head: Head, pixels: torch.Tensor, spec: PreprocessSpec, device: torch.device, batch_size: int = 128
) -> torch.Tensor:
    """N x D features of uint8 model pixels, on the CPU."""
    chunks = [
        head.forward(normalize(pixels[start : start + batch_size], spec).to(device)).features.cpu()
        for start in range(0, len(pixels), batch_size)
    ]
    if not chunks:
        raise XrayqError("dataset_invalid", "No images to fit an out-of-distribution reference on.")
    return torch.cat(chunks)


def colour_limit(reads: Sequence[Callable[[], bytes]]) -> float:
    """1.5x the chroma of the most colourful of an even sample of training images, at least MIN_COLOUR_LIMIT."""
    step = max(1, len(reads) // COLOUR_SAMPLE)
    most = 0.0
    for read in list(reads)[::step][:COLOUR_SAMPLE]:
        try:
            most = max(most, colourfulness(open_image(read(), STORED_MEMBER_LIMITS)))
        except XrayqError:
            continue
    return max(MIN_COLOUR_LIMIT, 1.5 * most)


def _evenly(pixels: torch.Tensor, most: int) -> torch.Tensor:
    if len(pixels) <= most:
        return pixels
    return pixels[torch.linspace(0, len(pixels) - 1, most).round().long()]


def _rate(distances: np.ndarray, threshold: float) -> float:
    return round(float(np.mean(distances > threshold)), 4) if len(distances) else 0.0
