"""Sizes read from codestreams themselves (shared/imaging/codestream.py), on real files and forged ones."""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from PIL import Image

from shared.core.errors import XrayqError
from shared.imaging.codestream import Codestream, codestream_size
from shared.imaging.dicom import compressed_frame


def jpeg(width: int = 80, height: int = 48, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3) if mode == "RGB" else (height, width), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    return buffer.getvalue()


def sof_size(data: bytes, width: int, height: int) -> bytes:
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


@pytest.fixture(scope="module")
def j2k_frame(data_dir) -> bytes:
    full = pydicom.dcmread(data_dir / "dicom" / "RG1_J2KR.dcm")
    frame = compressed_frame(full)
    assert frame is not None
    return frame


def test_jpeg_frame_headers_give_width_height_and_components() -> None:
    assert codestream_size(jpeg()) == Codestream(80, 48, 1)
    assert codestream_size(jpeg(mode="RGB")) == Codestream(80, 48, 3)
    assert codestream_size(sof_size(jpeg(), 14000, 15000)) == Codestream(14000, 15000, 1)


@pytest.mark.parametrize(
    "forge",
    [
        lambda data: data[:20],  # cut off before the frame header
        lambda data: sof_size(data, 64, 0),  # height left to a DNL marker, after the decoder allocated
        lambda data: data[:2] + data[data.index(b"\xff\xc0") : data.index(b"\xff\xda")] + data[2:],  # two frames
    ],
)
def test_forged_jpeg_headers_are_refused(forge) -> None:
    with pytest.raises(XrayqError) as refused:
        codestream_size(forge(jpeg()))
    assert refused.value.code == "image_unreadable"


def test_jpeg_2000_size_comes_from_siz_in_a_raw_codestream_or_a_jp2_file(j2k_frame) -> None:
    assert codestream_size(j2k_frame) == Codestream(1841, 1955, 1)
    boxes = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + struct.pack(">I4s4sI4s", 20, b"ftyp", b"jp2 ", 0, b"jp2 ")
    jp2 = boxes + struct.pack(">I4s", 8 + len(j2k_frame), b"jp2c") + j2k_frame
    assert codestream_size(jp2) == Codestream(1841, 1955, 1)
    forged = bytearray(j2k_frame)
    struct.pack_into(">II", forged, 8, 60000, 60000)  # Xsiz, Ysiz
    assert codestream_size(bytes(forged)) == Codestream(60000, 60000, 1)


def test_streams_without_their_own_size_give_none() -> None:
    assert codestream_size(b"\x00" * 64) is None  # native or RLE pixels: the container's size is the size
