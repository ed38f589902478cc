"""The size a compressed image's own codestream declares, read from its markers without decoding it.

A decoder allocates what the codestream says, not what the container around it says: an 832-byte
JPEG inside a DICOM file whose header declares 64x64 made the decoder allocate 186 MiB. So the pixel
cap is checked against these numbers before anything decodes (`shared.imaging.decode`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shared.core.errors import XrayqError

# Start-of-frame markers: baseline, extended, progressive, lossless (Huffman and arithmetic coded),
# and JPEG-LS's SOF55. Not C4 (DHT), C8 (JPG) or CC (DAC), which share the range.
_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# More components than any colour model needs would multiply the allocation past the pixel cap.
MAX_COMPONENTS = 4


@dataclass(frozen=True)
class Codestream:
    width: int
    height: int
    components: int


def codestream_size(data: bytes) -> Codestream | None:
    """What a JPEG (any SOF, JPEG-LS) or JPEG 2000 (raw codestream or JP2) stream declares; None for
    anything else (RLE, native pixels), whose size only the container gives."""
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data.startswith(_J2K_SOC_SIZ):
        return _j2k_siz(data, 4)
    if data.startswith(_JP2_SIGNATURE):
        return _jp2(data)
    return None


def _unreadable(detail: str) -> XrayqError:
    return XrayqError("image_unreadable", f"The image's codestream is malformed: {detail}.")


def _jpeg(data: bytes) -> Codestream:
    """The one frame header before the first scan. Several (a hierarchical or a forged file) are
    refused: decoders disagree on which one they use."""
    frames: list[Codestream] = []
    at = 2
    while True:
        while at < len(data) and data[at] == 0xFF and at + 1 < len(data) and data[at + 1] == 0xFF:
            at += 1  # fill bytes
        if at + 2 > len(data) or data[at] != 0xFF:
            raise _unreadable("no scan follows the JPEG header")
        marker = data[at + 1]
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        if marker == 0xDA:  # start of scan: the header is over
            break
        if at + 4 > len(data):
            raise _unreadable("a JPEG segment is cut off")
        (length,) = struct.unpack_from(">H", data, at + 2)
        if marker in _JPEG_SOF:
            if length < 8 or at + 10 > len(data):
                raise _unreadable("a JPEG frame header is cut off")
            height, width = struct.unpack_from(">HH", data, at + 5)
            frames.append(Codestream(width, height, data[at + 9]))
        at += 2 + length
    if len(frames) != 1:
        raise _unreadable(f"{len(frames)} JPEG frame headers instead of one")
    if frames[0].height == 0:  # the height would come later (a DNL marker), after the allocation
        raise _unreadable("the JPEG frame header gives no height")
    return frames[0]


def _j2k_siz(data: bytes, at: int) -> Codestream:
    """The SIZ segment that follows SOC: the reference grid less its offset, and the component count."""
    if at + 38 > len(data):
        raise _unreadable("the JPEG 2000 size segment is cut off")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, at + 4)
    (components,) = struct.unpack_from(">H", data, at + 36)
    if xosiz >= xsiz or yosiz >= ysiz:
        raise _unreadable("the JPEG 2000 image area is empty")
    return Codestream(xsiz - xosiz, ysiz - yosiz, components)


def _jp2(data: bytes) -> Codestream:
    """A JP2 file: the codestream in its `jp2c` box decides what is decoded."""
    at = 0
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if length == 1:
            if at + 16 > len(data):
                break
            (length,) = struct.unpack_from(">Q", data, at + 8)
            header = 16
        elif length == 0:
            length = len(data) - at
        if kind == b"jp2c":
            start = at + header
            if not data.startswith(_J2K_SOC_SIZ, start):
                raise _unreadable("the JP2 codestream box does not start with SOC and SIZ")
            return _j2k_siz(data, start + 4)
        if length < header:
            break
        at += length
    raise _unreadable("no codestream box in the JP2 file")
