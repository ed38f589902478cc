"""The check every submitted file gets, whichever path it came by: one image, or one DICOM instance.

`inspect` is the single answer to "is this a usable input?": size, type by content, the image or DICOM
header, the pixel count (before any decoding), completeness, and for DICOM the SOP class and frame
count. The paths differ only in what they do with a refusal: a single job answers it as the HTTP
error, a batch or ZIP keeps it as that file's failed job, study intake (`instances.py`) lists it,
a dataset upload lists the member as unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.imaging import dicom
from shared.imaging.decode import ImageLimits, MediaType, check_dicom, check_image, sniff_media_type
from shared.intake import refusals
from shared.intake.sop_classes import check_sop_class
from shared.intake.upload import Upload

# Training examples may be smaller than what is classified (MedMNIST is 28 x 28): the one deliberate
# difference between a dataset member and a submitted image.
DATASET_MIN_SIDE = 8


@dataclass(frozen=True)
class Inspected:
    media_type: MediaType
    dicom: dict[str, str] | None = None  # identifying tags of a DICOM instance
    header: pydicom.Dataset | None = None  # a DICOM instance's data set, without its pixels


def image_limits(settings: Settings) -> ImageLimits:
    """The pixel limits of images to classify (the worker decodes under the same ones)."""
    return ImageLimits(max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)


def dataset_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(max_pixels=settings.max_image_pixels, min_side=DATASET_MIN_SIDE)


def inspect(filename: str, data: bytes, settings: Settings, limits: ImageLimits | None = None) -> Inspected:
    """The file's type (and DICOM tags) if it is a usable input; its XrayqError if not."""
    if len(data) > settings.max_file_bytes:
        raise refusals.file_too_large(filename, settings.max_file_bytes)
    limits = limits or image_limits(settings)
    media_type = sniff_media_type(data)
    if media_type == "application/zip":
        raise refusals.nested_archive()
    if media_type != "application/dicom":
        return Inspected(check_image(data, limits))
    header = dicom.read_header(data, settings.max_file_bytes * dicom.INFLATION_FACTOR)
    check_sop_class(header)
    check_dicom(data, header, limits)
    return Inspected(media_type, dicom.identifying_tags(header), header)


def check_file(filename: str, data: bytes, settings: Settings) -> Upload:
    """A file to classify, as an `Upload` that carries its refusal (a batch keeps its place)."""
    try:
        inspected = inspect(filename, data, settings)
    except XrayqError as error:
        if error.code == "file_too_large":  # only a prefix was read: keep none of it, as for a ZIP entry
            return Upload(filename, b"", None, error)
        return Upload(filename, data, sniff_media_type(data), error)
    return Upload(filename, data, inspected.media_type, dicom=inspected.dicom)


def check_dataset_member(filename: str, data: bytes, settings: Settings) -> MediaType:
    """A training example: the same checks as a file to classify, with `dataset_limits`."""
    return inspect(filename, data, settings, dataset_limits(settings)).media_type
