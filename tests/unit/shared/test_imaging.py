from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from shared.core.errors import XrayqError
from shared.imaging.decode import ImageLimits, check_image, decode_image, open_image, sniff_media_type
from shared.imaging.preprocess import PreprocessSpec, preprocess
from tests.conftest import jpeg_bytes, png_bytes


def gradient(height: int = 64, width: int = 48) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))


def test_sniffs_by_content_not_name() -> None:
    assert sniff_media_type(png_bytes(gradient())) == "image/png"
    assert sniff_media_type(jpeg_bytes(gradient())) == "image/jpeg"
    assert sniff_media_type(b"\x00" * 128 + b"DICM" + b"\x00" * 10) == "application/dicom"
    assert sniff_media_type(b"PK\x03\x04rest") == "application/zip"
    assert sniff_media_type(b"%PDF-1.7") is None
    assert sniff_media_type(b"") is None


def test_decodes_8bit_grey_png_to_unit_range() -> None:
    array = decode_image(png_bytes(gradient()))
    assert array.shape == (64, 48)
    assert array.dtype == np.float32
    assert array.min() == 0.0 and array.max() == 1.0


def test_decodes_16bit_grey_png_with_full_precision() -> None:
    values = np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (64, 1))
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    array = decode_image(buffer.getvalue())
    assert array.shape == (64, 48)
    assert array.max() == pytest.approx(1.0)
    # 16-bit steps survive (an 8-bit path would collapse neighbouring values)
    assert len(np.unique(array)) == len(np.unique(values))


def test_decodes_rgb_jpeg() -> None:
    rgb = np.stack([gradient(), gradient()[::-1], np.full((64, 48), 128, np.uint8)], axis=2)
    array = decode_image(jpeg_bytes(rgb))
    assert array.shape == (64, 48, 3)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"hello, this is text and not an image at all", "unsupported_media_type"),
        (jpeg_bytes(gradient(256, 256))[:600], "image_unreadable"),  # truncated
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image_unreadable"),  # right magic, garbage inside
        (png_bytes(gradient(8, 8)), "image_too_small"),
    ],
)
def test_refuses_broken_input_with_stable_codes(data: bytes, code: str) -> None:
    with pytest.raises(XrayqError) as caught:
        decode_image(data)
    assert caught.value.code == code


def test_refuses_decompression_bomb_before_decoding() -> None:
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")  # a few KB that would expand to 81 Mpx
    with pytest.raises(XrayqError) as caught:
        decode_image(buffer.getvalue(), ImageLimits(max_pixels=40_000_000))
    assert caught.value.code == "image_too_large"


def test_preprocess_gives_model_input_of_spec_size() -> None:
    spec = PreprocessSpec(size=32, color="grayscale", mean=(0.5,), std=(0.25,))
    tensor = preprocess(decode_image(png_bytes(gradient())), spec)
    assert tensor.shape == (3, 32, 32)  # grey repeated to 3 channels: any torchvision net fits
    assert torch.equal(tensor[0], tensor[1])
    assert tensor.min() >= -2.0 and tensor.max() <= 2.0


def test_preprocess_treats_grey_and_rgb_copies_of_one_image_alike() -> None:
    spec = PreprocessSpec(size=32)
    grey = gradient()
    rgb = np.stack([grey] * 3, axis=2)
    a = preprocess(decode_image(png_bytes(grey)), spec)
    b = preprocess(decode_image(png_bytes(rgb)), spec)
    assert torch.allclose(a, b, atol=0.02)


def test_spec_round_trips_through_a_card() -> None:
    spec = PreprocessSpec(size=96, color="rgb", mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_check_image_refuses_truncation_without_decoding() -> None:
    jpeg = jpeg_bytes(gradient(256, 256))
    png = png_bytes(gradient(256, 256))
    assert check_image(jpeg) == "image/jpeg"
    assert check_image(png) == "image/png"
    for cut in (jpeg[: len(jpeg) // 2], png[: len(png) // 2]):
        with pytest.raises(XrayqError) as caught:
            check_image(cut)
        assert caught.value.code == "image_unreadable"


def test_damage_inside_a_complete_stream_is_left_to_the_full_decode() -> None:
    png = bytearray(png_bytes(gradient(256, 256)))
    png[60:120] = b"\x00" * 60  # inside the compressed data: header and end marker intact
    assert check_image(bytes(png)) == "image/png"
    with pytest.raises(XrayqError) as caught:
        open_image(bytes(png))
    assert caught.value.code == "image_unreadable"
