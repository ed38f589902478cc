"""Image intake: identify uploads by content and decode them safely into float arrays.

No torch here: the gateway validates uploads with this module and stays light.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError

from shared.core.errors import XrayqError
from shared.imaging import dicom
from shared.imaging.codestream import MAX_COMPONENTS, Codestream, codestream_size

MediaType = Literal["image/png", "image/jpeg", "application/dicom", "application/zip"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or the end record of an empty archive

# Pillow's own bomb guard is a warning up to 2x its limit; we check sizes ourselves before decoding and
# turn Pillow's guard into a hard error as a second line.
warnings.simplefilter("error", Image.DecompressionBombWarning)


def sniff_media_type(data: bytes) -> MediaType | None:
    """The upload's type from its first bytes; file names and client-sent types are not trusted."""
    if data.startswith(PNG_MAGIC):
        return "image/png"
    if data.startswith(JPEG_MAGIC):
        return "image/jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "application/dicom"
    if data.startswith(ZIP_MAGICS):
        return "application/zip"
    return None


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 40_000_000
    min_side: int = 32


def check_image(data: bytes, limits: ImageLimits | None = None) -> MediaType:
    """Cheap validation for the submit path: type by content, header, size, and a complete stream.

    No full decode: the header gives the pixel count (so bombs are refused before any decoding) and
    the file's end shows truncation (a JPEG's EOI marker, a PNG's IEND chunk); for DICOM, the header
    and a decoder for its transfer syntax. Damage deeper inside the stream is found by the worker's
    decode and fails that job alone.
    """
    limits = limits or ImageLimits()
    media_type = _supported_type(data)
    if media_type == "application/dicom":
        check_dicom(data, dicom.read_header(data), limits)
        return media_type
    _open_header(data, limits)
    tail = data[-4096:]
    complete = b"\xff\xd9" in tail if media_type == "image/jpeg" else b"IEND" in tail[-64:]
    if not complete:
        raise XrayqError("image_unreadable", "The image is truncated (its end marker is missing).")
    return media_type


def check_dicom(data: bytes, header: pydicom.Dataset, limits: ImageLimits) -> pydicom.Dataset:
    """`check_image` for a DICOM file whose header (`dicom.read_header`) the caller has read already;
    returns the whole data set, ready for `dicom.decode`.

    Beyond the header: a compressed frame's own codestream must declare the header's size (the decoder
    allocates what the codestream says), and the Modality and VOI LUTs or window must apply (tried on
    two pixels), so the worker never meets a file that intake would have refused.
    """
    width, height = dicom.size_of(header)
    _check_size(width, height, limits)
    dicom.check_single_frame(header)
    full = dicom.read_complete(data, header)
    frame = dicom.compressed_frame(full)
    declared = codestream_size(frame) if frame is not None else None
    if declared is not None:
        _check_codestream(declared, limits)
        if (declared.width, declared.height) != (width, height):
            raise XrayqError(
                "dicom_dimension_mismatch",
                f"The compressed frame is {declared.width}x{declared.height}; the header says {width}x{height}.",
            )
    dicom.check_display_pipeline(header)
    return full


def open_image(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Fully decode a PNG (8/16-bit, grey, RGB, palette, alpha), JPEG or DICOM, checking its size first
    (the codestream's as well as the container's) and running every check intake runs.

    Raises XrayqError with a stable code for anything that is not a complete, readable image of
    sensible size.
    """
    limits = limits or ImageLimits()
    if _supported_type(data) == "application/dicom":
        return dicom.decode(check_dicom(data, dicom.read_header(data), limits))
    image = _open_header(data, limits)
    try:
        image.load()  # full decode: a truncated or corrupt stream fails here
    except _DECODE_ERRORS as exc:
        raise XrayqError("image_unreadable", f"The image could not be decoded: {exc}") from None
    return image


_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def _supported_type(data: bytes) -> MediaType:
    if not data:
        raise XrayqError("empty_file", "The file is empty.")
    media_type = sniff_media_type(data)
    if media_type not in ("image/png", "image/jpeg", "application/dicom"):
        raise XrayqError("unsupported_media_type", "The file is not a PNG, JPEG or DICOM image (checked by content).")
    return media_type


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise XrayqError(
            "image_too_large", f"The image has {width}x{height} pixels; the limit is {limits.max_pixels} pixels."
        )
    if min(width, height) < limits.min_side:
        raise XrayqError(
            "image_too_small",
            f"The image is {width}x{height}; both sides must be at least {limits.min_side} pixels.",
        )


def _open_header(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # past Pillow's own cap
        raise XrayqError("image_too_large", f"The image is too large: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise XrayqError("image_unreadable", f"The image could not be read: {exc}") from None
    _check_size(*image.size, limits)
    declared = codestream_size(data)  # a JPEG's frame headers: exactly one, the one Pillow read
    if declared is not None:
        _check_codestream(declared, limits)
    return image


def _check_codestream(declared: Codestream, limits: ImageLimits) -> None:
    """What the decoder will allocate, checked before it runs."""
    _check_size(declared.width, declared.height, limits)
    if not 1 <= declared.components <= MAX_COMPONENTS:
        raise XrayqError(
            "image_unreadable", f"The codestream declares {declared.components} components; at most 4 are read."
        )


def decode_image(data: bytes, limits: ImageLimits | None = None) -> np.ndarray:
    """`open_image` as float32 in [0, 1]: HxW for grey images, HxWx3 for colour ones."""
    return to_float_array(open_image(data, limits))


HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


def to_float_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if mode == "I":
        # 16-bit PNGs may load as 32-bit ints; their range is still 16 bits.
        array = np.asarray(image, dtype=np.float32)
        return np.clip(array / 65535.0, 0.0, 1.0)
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        lo, hi = float(array.min()), float(array.max())
        return (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    if mode in ("L", "1"):
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if mode == "LA":
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
