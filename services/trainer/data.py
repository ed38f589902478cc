"""Labelled data for training: a dataset's images, held in memory as model pixels.

Images are decoded once with the serving decoder and reduced to the model's input pixels
(`to_model_pixels`), so training sees exactly what the worker will feed the model.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared.core.errors import XrayqError
from shared.imaging.decode import ImageLimits, decode_image, open_image
from shared.imaging.preprocess import PreprocessSpec, to_model_pixels
from shared.intake.images import DATASET_MIN_SIDE

# Dataset members were checked at upload (`shared.intake.images.dataset_limits`); decoding them again for
# training keeps the same smallest side, so a MedMNIST-sized member that was accepted is never refused here.
STORED_MEMBER_LIMITS = ImageLimits(min_side=DATASET_MIN_SIDE)


@dataclass
class LabelledImages:
    """uint8 pixels (N x C x S x S), integer labels, class names and a group id per image."""

    pixels: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    groups: list[str]
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> LabelledImages:
        idx = torch.as_tensor(index, dtype=torch.long)
        return LabelledImages(
            pixels=self.pixels[idx],
            labels=self.labels[idx],
            classes=self.classes,
            groups=[self.groups[i] for i in index],
            names=[self.names[i] for i in index] if self.names else [],
        )

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts, strict=True))


# Kermany file names: person123_bacteria_456.jpeg (one patient, several images), IM-0115-0001.jpeg,
# NORMAL2-IM-0123-0001.jpeg. Images of one patient must not straddle the train/validation split.
_PATIENT_PATTERNS = (re.compile(r"^(person\d+)_"), re.compile(r"^((?:NORMAL2-)?IM-\d+)-"))


def patient_group(filename: str) -> str:
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(filename)
        if match:
            return match.group(1)
    return Path(filename).stem


@dataclass(frozen=True)
class Example:
    """One labelled image, by name, with a function that gives its bytes (a file, an object)."""

    name: str
    label: int
    read: Callable[[], bytes]


def load_examples(
    examples: Sequence[Example],
    classes: list[str],
    spec: PreprocessSpec,
    *,
    max_unreadable: float = 0.05,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 8,
) -> LabelledImages:
    """Fetch and decode every example (in threads: reads may be network calls) into model pixels.

    A few unreadable files are left out; more than `max_unreadable` of them fail the load.
    """
    limits = STORED_MEMBER_LIMITS

    def decode(example: Example) -> torch.Tensor | None:
        try:
            return to_model_pixels(open_image(example.read(), limits), spec)
        except XrayqError:
            return None

    pixels: list[torch.Tensor] = []
    kept: list[Example] = []
    unreadable: list[str] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for done, (example, tensor) in enumerate(zip(examples, pool.map(decode, examples), strict=True), 1):
            if tensor is None:
                unreadable.append(example.name)
            else:
                pixels.append(tensor)
                kept.append(example)
            if progress is not None and (done % 256 == 0 or done == len(examples)):
                progress(done, len(examples))
    if unreadable and len(unreadable) > max_unreadable * len(examples):
        raise XrayqError("dataset_invalid", f"{len(unreadable)} unreadable images, e.g. {unreadable[:5]}.")
    if not pixels:
        raise XrayqError("dataset_invalid", "No readable images.")
    return LabelledImages(
        pixels=torch.stack(pixels),
        labels=torch.tensor([e.label for e in kept], dtype=torch.long),
        classes=classes,
        groups=[patient_group(Path(e.name).name) for e in kept],
        names=[e.name for e in kept],
    )


def cap_per_class(examples: list[Example], cap: int | None) -> list[Example]:
    """The first `cap` examples of each label, in order (all of them when `cap` is None)."""
    if cap is None:
        return examples
    taken: dict[int, int] = {}
    kept = []
    for example in examples:
        if taken.get(example.label, 0) < cap:
            taken[example.label] = taken.get(example.label, 0) + 1
            kept.append(example)
    return kept


def decoded(examples: list[Example], loaded: LabelledImages) -> list[Example]:
    """The examples that decoded (unreadable ones were left out), in `loaded`'s order."""
    names = set(loaded.names)
    return [e for e in examples if e.name in names]


def split_by_group(data: LabelledImages, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed validation split that keeps each group (patient) on one side, stratified by class.

    Groups are stratified by their most common label and ordered by a hash of their id and the seed,
    not by a random generator, so the split stays the same across library versions and as long as the
    files do.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(data.groups):
        members[group].append(index)
    labels = data.labels.tolist()
    by_class: dict[int, list[str]] = defaultdict(list)
    for group, indices in members.items():
        majority = max(set(labels[i] for i in indices), key=lambda label: sum(labels[i] == label for i in indices))
        by_class[majority].append(group)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for _label, groups in sorted(by_class.items()):
        order = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        target = round(val_fraction * sum(len(members[g]) for g in groups))
        if len(groups) >= 2:  # tiny classes still get one group held out, and keep at least one
            target = max(target, 1)
        taken = 0
        for group in order:
            side = val_idx if taken < target else train_idx
            side.extend(members[group])
            if side is val_idx:
                taken += len(members[group])
    return np.array(sorted(train_idx), dtype=np.int64), np.array(sorted(val_idx), dtype=np.int64)


def train_val_split(data: LabelledImages, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`split_by_group`, refusing data too small to leave both sides non-empty."""
    train_idx, val_idx = split_by_group(data, val_fraction, seed)
    if len(val_idx) == 0 or len(train_idx) < 2:
        raise XrayqError(
            "dataset_invalid",
            f"{len(data)} images are too few for a training and a validation split at val_fraction={val_fraction}.",
        )
    return train_idx, val_idx


def detect_color_of(reads: Sequence[Callable[[], bytes]], sample: int = 24) -> str:
    """The same decision from an evenly spaced sample of images given by their readers."""
    step = max(1, len(reads) // sample)
    for read in reads[::step][:sample]:
        try:
            array = decode_image(read(), STORED_MEMBER_LIMITS)
        except XrayqError:
            continue
        if array.ndim == 3 and float(np.abs(array - array.mean(axis=2, keepdims=True)).max()) > 0.04:
            return "rgb"
    return "grayscale"
