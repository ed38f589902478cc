"""MedMNIST-style `.npz` uploads, read one image at a time.

An `.npz` is a ZIP of `.npy` arrays, and numpy allocates whatever an array's header declares before it
reads a byte of data. So every header is read and checked first: an array may not declare more data
than its member holds (the members' sizes are already bounded by the dataset limits), labels must lie
within the declared classes, and images are then read from their member one at a time, turned into
PNGs and dropped, so the upload is never in memory whole.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.intake import refusals
from shared.training.manifest import ManifestEntry, NewDataset

SPLIT_OF_PREFIX = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# Without class names, labels 0..n-1 name n classes; past this many, a label is a mistake or an attack
# (one label of 2**31 would otherwise make two billion class names).
MAX_UNNAMED_CLASSES = 1000
_ZIP_ERRORS = (zipfile.BadZipFile, NotImplementedError, OSError, RuntimeError, EOFError, ValueError)


@dataclass(frozen=True)
class NpyArray:
    """One `.npy` member as its header declares it."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int  # where the data starts within the member


def read_npz(archive: zipfile.ZipFile, settings: Settings, classes: list[str] | None) -> NewDataset:
    """MedMNIST layout: `{split}_images` (N x H x W [x 3], uint8) and `{split}_labels` (N or N x 1)."""
    arrays = {info.filename.removesuffix(".npy"): read_npy_header(archive, info) for info in archive.infolist()}
    splits: dict[str, tuple[NpyArray, np.ndarray]] = {}
    for key, array in arrays.items():
        if not key.endswith("_images"):
            continue
        prefix = key.removesuffix("_images")
        split, labels = SPLIT_OF_PREFIX.get(prefix), arrays.get(f"{prefix}_labels")
        if split is None or labels is None:
            raise XrayqError("dataset_invalid_layout", f"{key!r}: expected train/val/test _images with _labels.")
        splits[split] = (_checked_images(split, array, settings), _read_labels(archive, labels))
    if not splits:
        raise XrayqError("dataset_empty", "The .npz has no '<split>_images' arrays.")
    names = _class_names([labels for _, labels in splits.values()], classes)
    _check_counts(splits, settings)

    def pngs() -> Iterator[tuple[str, int, str, bytes]]:
        for split, (images, labels) in splits.items():
            for index, image in enumerate(_images(archive, images)):
                yield split, index, names[int(labels[index])], _png_bytes(image)

    entries: list[ManifestEntry] = []
    for split, index, label, png in pngs():
        sha256 = hashlib.sha256(png).hexdigest()
        path = f"{split}/{label}/{split}_{index:06d}.png"
        entries.append(ManifestEntry(path, split, label, sha256, len(png), "image/png"))

    def files() -> Iterator[tuple[str, bytes]]:  # encoded again when stored: one image in memory at a time
        seen: set[str] = set()
        for *_, png in pngs():
            sha256 = hashlib.sha256(png).hexdigest()
            if sha256 not in seen:
                seen.add(sha256)
                yield sha256, png

    details = {"source": "npz", "layout": "npz", "arrays": sorted(arrays)}
    return NewDataset(entries, details, files)


def _check_counts(splits: dict[str, tuple[NpyArray, np.ndarray]], settings: Settings) -> None:
    for split, (images, labels) in splits.items():
        if images.shape[0] != len(labels):
            raise XrayqError(
                "dataset_invalid_layout", f"{split}_images has {images.shape[0]} images for {len(labels)} labels."
            )
    total = sum(len(labels) for _, labels in splits.values())
    if total > settings.max_dataset_files:
        raise refusals.too_many_files(total, settings.max_dataset_files)


def read_npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> NpyArray:
    """The member's declared shape and dtype, refused if it declares more data than the member holds."""
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = member.tell()
    except _ZIP_ERRORS as exc:
        raise refusals.archive_unreadable(f"{info.filename!r} is not a readable .npy array: {exc}") from None
    if dtype.hasobject:
        raise XrayqError("dataset_invalid_layout", f"{info.filename!r} holds Python objects, not numbers.")
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size - offset:
        raise refusals.archive_unreadable(
            f"{info.filename!r} declares {declared} bytes of data but holds {info.file_size - offset}."
        )
    return NpyArray(info, tuple(shape), dtype, fortran_order, offset)


def _checked_images(split: str, images: NpyArray, settings: Settings) -> NpyArray:
    shape = images.shape
    channels_ok = len(shape) == 3 or (len(shape) == 4 and shape[3] in (3, 4))
    if images.dtype != np.uint8 or not channels_ok or images.fortran_order:
        raise XrayqError(
            "dataset_invalid_layout",
            f"{split}_images must be uint8 N x H x W (x 3) in C order; got {images.dtype} {shape}.",
        )
    if shape[1] * shape[2] > settings.max_image_pixels:
        raise XrayqError("image_too_large", f"{split}_images are {shape[2]}x{shape[1]}, over the pixel limit.")
    return images


def _read_labels(archive: zipfile.ZipFile, labels: NpyArray) -> np.ndarray:
    """Labels are small (one number per image) and already bounded by their member's size."""
    if not np.issubdtype(labels.dtype, np.integer) or len(labels.shape) not in (1, 2):
        raise XrayqError("dataset_invalid_layout", "Labels must be non-negative integers (one per image).")
    try:
        with archive.open(labels.info) as member:
            values = np.lib.format.read_array(member, allow_pickle=False)
    except _ZIP_ERRORS as exc:
        raise refusals.archive_unreadable(f"{labels.info.filename!r} could not be read: {exc}") from None
    return values.reshape(-1)


def _class_names(labels: list[np.ndarray], classes: list[str] | None) -> list[str]:
    """The class names, refusing a label outside them before any list as long as a label is made."""
    everything = np.concatenate(labels)
    if everything.size == 0:
        raise XrayqError("dataset_empty", "The .npz holds no images.")
    if everything.min() < 0:
        raise XrayqError("dataset_invalid_layout", "Labels must be non-negative integers (one per image).")
    top = int(everything.max())
    if classes is not None and top >= len(classes):
        raise XrayqError(
            "dataset_invalid_layout", f"The labels go up to {top} but only {len(classes)} class names came."
        )
    if classes is None and top >= MAX_UNNAMED_CLASSES:
        raise XrayqError(
            "dataset_invalid_layout",
            f"The labels go up to {top}; without class names at most {MAX_UNNAMED_CLASSES} classes are accepted.",
        )
    return classes or [str(i) for i in range(top + 1)]


def _images(archive: zipfile.ZipFile, images: NpyArray) -> Iterator[np.ndarray]:
    per_image = math.prod(images.shape[1:])
    try:
        with archive.open(images.info) as member:
            member.read(images.data_offset)
            for _ in range(images.shape[0]):
                data = member.read(per_image)
                if len(data) < per_image:
                    raise EOFError("the array ends early")
                yield np.frombuffer(data, np.uint8).reshape(images.shape[1:])
    except _ZIP_ERRORS as exc:
        raise refusals.archive_unreadable(f"{images.info.filename!r} could not be read: {exc}") from None


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()
