"""DICOM Part-10 input: header checks, then pixels as a radiologist's viewer would show them.

Pipeline (PS3.3 C.11): stored values -> Modality LUT (rescale slope/intercept) -> VOI LUT or window
(first one given) -> MONOCHROME1 / INVERSE presentation inverted, so bone is always bright. The
result is a float image in [0, 1] that enters the same preprocessing as PNG and JPEG. Compressed
transfer syntaxes decode through pylibjpeg's plugins (JPEG baseline/extended/lossless, JPEG-LS,
JPEG 2000, RLE); a syntax without a decoder, an object without pixels, or more than one frame is
refused with its own code, never turned into a wrong image.
"""

from __future__ import annotations

import io
import re
import uuid
import warnings
import zlib
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import get_expected_length, pixel_dtype

from shared.core.errors import XrayqError

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")


DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
# A deflated data set may inflate to this many times the per-file limit (real ones compress 2-4x).
INFLATION_FACTOR = 4
DEFAULT_MAX_INFLATED_BYTES = INFLATION_FACTOR * 32 * 1024 * 1024  # with the default XRAYQ_MAX_FILE_BYTES
_INFLATE_CHUNK = 1024 * 1024


def read_header(data: bytes, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> pydicom.Dataset:
    """The data set without its pixels, checked for what decoding will need."""
    check_inflated_size(data, max_inflated_bytes)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise XrayqError("dicom_unreadable", f"The DICOM file could not be parsed: {exc}") from None
    except RecursionError:  # pydicom parses nested sequences recursively: hundreds of levels exhaust the stack
        raise XrayqError("dicom_unreadable", "The DICOM file nests its sequences too deeply.") from None
    if not _has_pixel_data(data):
        raise XrayqError("dicom_no_pixel_data", "The DICOM object holds no image (no Pixel Data).")
    for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if keyword not in ds:
            raise XrayqError("dicom_no_pixel_data", f"The DICOM object holds no image (no {keyword}).")
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric not in MONOCHROME + COLOUR:
        raise XrayqError("dicom_unsupported_photometric", f"Photometric interpretation {photometric} is not supported.")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        raise XrayqError("dicom_unreadable", "The DICOM file has no transfer syntax in its meta header.")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        name = getattr(syntax, "name", str(syntax))
        raise XrayqError("dicom_unsupported_transfer_syntax", f"No decoder for the transfer syntax {name}.")
    return ds


def check_inflated_size(data: bytes, limit: int) -> None:
    """Refuse (`file_too_large`) a Deflated Explicit VR Little Endian data set that inflates past `limit`.

    pydicom inflates such a data set whole, in one call, before reading a tag: a few kilobytes of
    deflate can declare gigabytes. Here the inflated bytes are counted a chunk at a time, none kept.
    """
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
    except Exception:  # not Part 10, or a broken meta header: read_header reports it
        return
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_EXPLICIT_VR_LE:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, inflated = data[stream.tell() :], 0
    try:
        while pending and not inflater.eof:
            inflated += len(inflater.decompress(pending, _INFLATE_CHUNK))
            pending = inflater.unconsumed_tail
            if inflated > limit:
                raise XrayqError("file_too_large", f"The deflated data set inflates past {limit} bytes.")
    except zlib.error as exc:
        raise XrayqError("dicom_unreadable", f"The deflated data set could not be inflated: {exc}") from None


def read_complete(data: bytes, header: pydicom.Dataset) -> pydicom.Dataset:
    """The whole data set, refused if cut off inside its pixel data (an interrupted transfer), without
    decoding it: native pixels must be as long as the header says, encapsulated ones must reach their
    delimiter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns "end of file reached": that is what we test
        try:
            full = pydicom.dcmread(io.BytesIO(data))
        except Exception as exc:  # a reader that fails here has found the damage too
            raise XrayqError("dicom_unreadable", f"The DICOM file could not be read: {exc}") from None
    pixels = full.get("PixelData")
    if pixels is None:
        raise XrayqError("dicom_truncated", "The DICOM file ends inside its pixel data.")
    if not header.file_meta.TransferSyntaxUID.is_compressed and len(pixels) < get_expected_length(full, "bytes"):
        raise XrayqError("dicom_truncated", "The DICOM file ends inside its pixel data.")
    return full


def compressed_frame(full: pydicom.Dataset) -> bytes | None:
    """The first frame's codestream of an encapsulated (compressed) object; None for native pixels."""
    if not full.file_meta.TransferSyntaxUID.is_encapsulated:
        return None
    try:
        return get_frame(full.PixelData, 0, number_of_frames=1)
    except Exception as exc:  # a broken item structure: no decoder could find the frame either
        raise XrayqError("dicom_unreadable", f"The DICOM pixel data holds no readable frame: {exc}") from None


def check_single_frame(header: pydicom.Dataset) -> None:
    """One picture per instance: a multi-frame object (a clip, a stack) is refused, not half-read."""
    if int(header.get("NumberOfFrames", 1) or 1) > 1:
        raise XrayqError("dicom_multiframe", "Multi-frame DICOM is not supported; send single-frame images.")


def _has_pixel_data(data: bytes) -> bool:
    # The (7FE0,0010) tag, little or big endian: cheap, and the full decode has the last word.
    return b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data


IDENTIFYING_TAGS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "AccessionNumber",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
)


# Name-based UIDs (PS3.5 B.2: "2.25." and a UUID as an integer; here a UUID v5 of the parts): the same
# parts always give the same UID, so a rebuilt report or a re-run de-identification repeats itself.
_UID_NAMESPACE = uuid.UUID("6f1c3f0e-6a43-4d0a-9a36-2f1b5c0e7a11")


def derived_uid(*parts: str) -> str:
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def identifying_tags(ds: pydicom.Dataset) -> dict[str, str]:
    """What an integration needs to file the result: study, series, instance, accession, and what it shows.

    Control characters are left out: a sender may put them in any text, but no database or client
    should receive them (Postgres refuses NUL outright)."""
    tags = {}
    for keyword in IDENTIFYING_TAGS:
        value = "".join(ch for ch in str(ds.get(keyword, "") or "") if ch.isprintable()).strip()
        if value:
            tags[keyword] = value
    return tags


# PS3.5 9.1: components of digits separated by dots, no component empty or with a leading zero
# (a lone "0" is fine), 64 characters at most.
UID_MAX_LENGTH = 64
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def uid_problem(value: str) -> str | None:
    """Why `value` is not a valid UID, or None if it is one."""
    if len(value) > UID_MAX_LENGTH:
        return f"is {len(value)} characters long; a UID has at most {UID_MAX_LENGTH}"
    if not _UID.fullmatch(value):
        return "is not digits separated by dots without leading zeros"
    return None


def suitability_warnings(
    tags: dict[str, str] | None, intended_use: dict[str, list[str]] | None
) -> list[dict[str, str]]:
    """Flags for inputs a model was not made for (by its card's intended use), instead of silence."""
    if not tags or not intended_use:
        return []
    warnings = []
    body_part, modality = tags.get("BodyPartExamined", "").upper(), tags.get("Modality", "").upper()
    body_parts = [part.upper() for part in intended_use.get("body_parts", [])]
    modalities = [m.upper() for m in intended_use.get("modalities", [])]
    if body_part and body_parts and body_part not in body_parts:
        warnings.append(
            {
                "code": "body_part_mismatch",
                "detail": f"BodyPartExamined is {body_part}; the model is for {', '.join(body_parts)}.",
            }
        )
    if modality and modalities and modality not in modalities:
        warnings.append(
            {
                "code": "modality_mismatch",
                "detail": f"Modality is {modality}; the model is for {', '.join(modalities)}.",
            }
        )
    return warnings


def size_of(ds: pydicom.Dataset) -> tuple[int, int]:
    return int(ds.Columns), int(ds.Rows)


def decode(full: pydicom.Dataset) -> Image.Image:
    """Full decode of a checked data set (`decode.check_dicom`) into a float ('F') image in [0, 1],
    display-ready."""
    try:
        array: Any = full.pixel_array  # colour models (YBR...) come back as RGB
    except Exception as exc:  # decoders raise many types; none may escape as a 500
        raise XrayqError("image_unreadable", f"The DICOM pixel data could not be decoded: {exc}") from None
    photometric = str(full.PhotometricInterpretation).strip()
    if array.ndim == 3:  # colour, already converted to RGB: ITU-R 601 luma
        grey = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return _unit_image(grey)
    image = _unit_range(display_values(array, full))
    if photometric == "MONOCHROME1" or str(full.get("PresentationLUTShape", "")).strip() == "INVERSE":
        image = 1.0 - image
    return Image.fromarray(image, mode="F")


def display_values(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored values -> Modality LUT (or rescale) -> VOI LUT (or window), as finite float32; a LUT or
    window that cannot be applied (WindowWidth 0, a broken LUT descriptor, a NaN slope) raises
    `dicom_invalid_lut`, whatever the pixels."""
    try:
        values = apply_modality_lut(stored, ds).astype(np.float64)
        values = apply_voi_lut(values, ds, index=0).astype(np.float32)
    except Exception as exc:  # pydicom raises ValueError, TypeError, IndexError... for bad parameters
        raise XrayqError("dicom_invalid_lut", f"The DICOM display LUT or window cannot be applied: {exc}") from None
    if not np.isfinite(values).all():
        raise XrayqError("dicom_invalid_lut", "The DICOM display LUT or window gives values that are not finite.")
    return values


def check_display_pipeline(header: pydicom.Dataset) -> None:
    """Run `display_values` on the extremes of the stored value range (two pixels, no decoding), so a
    file whose LUT or window the worker could not apply is refused at intake, not in the worker."""
    if int(header.get("SamplesPerPixel", 1) or 1) != 1:
        return  # colour: no LUTs are applied
    try:
        bits = int(header.get("BitsStored") or header.BitsAllocated)
        signed = int(header.get("PixelRepresentation", 0) or 0) == 1
        probe = np.array([[-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1]])
        probe = probe.astype(pixel_dtype(header))
    except Exception as exc:
        raise XrayqError("dicom_unreadable", f"The DICOM pixel description is inconsistent: {exc}") from None
    display_values(probe, header)


def _unit_range(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _unit_image(values: np.ndarray) -> Image.Image:
    return Image.fromarray(_unit_range(values), mode="F")
