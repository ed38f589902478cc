"""DICOM decoding on the real sample files in ../shared/data/dicom (and objects derived from them)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from shared.core.errors import XrayqError
from shared.imaging.decode import check_image, open_image, to_float_array


@pytest.fixture(scope="module")
def dicom_dir(data_dir):
    return data_dir / "dicom"


def read(dicom_dir, name: str) -> bytes:
    return (dicom_dir / f"{name}.dcm").read_bytes()


def derived(data: bytes, **changes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        elif keyword == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
            ds.PixelData = encapsulate([b"\x00" * 64])  # compressed syntaxes need encapsulated frames
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_monochrome1_is_inverted_so_dense_tissue_is_bright(dicom_dir) -> None:
    data = read(dicom_dir, "RG1_UNCR")
    assert check_image(data) == "application/dicom"
    image = to_float_array(open_image(data))
    stored = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert image.shape == stored.shape == (1955, 1841)
    # In MONOCHROME1 the highest stored value is displayed darkest.
    assert image.flat[stored.argmax()] < 0.05
    assert image.flat[stored.argmin()] > 0.95


def test_jpeg2000_decodes_to_the_same_pixels_as_uncompressed(dicom_dir) -> None:
    lossless = to_float_array(open_image(read(dicom_dir, "RG1_J2KR")))
    plain = to_float_array(open_image(read(dicom_dir, "RG1_UNCR")))
    assert np.array_equal(lossless, plain)


def test_ten_bit_extremity_decodes_to_full_range(dicom_dir) -> None:
    image = to_float_array(open_image(read(dicom_dir, "RG3_UNCR")))
    assert image.min() == 0.0 and image.max() == 1.0


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda d: read(d, "CR_tiny_16x16"), "image_too_small"),
        (lambda d: derived(read(d, "RG3_UNCR"), PixelData=None), "dicom_no_pixel_data"),
        (
            lambda d: derived(read(d, "RG3_UNCR"), TransferSyntaxUID="1.2.840.10008.1.2.4.100"),
            "dicom_unsupported_transfer_syntax",
        ),
        (lambda d: derived(read(d, "RG3_UNCR"), PhotometricInterpretation="HSV"), "dicom_unsupported_photometric"),
        (lambda d: derived(read(d, "RG3_UNCR"), NumberOfFrames=3), "dicom_multiframe"),
    ],
)
def test_broken_or_unsupported_dicom_gets_its_own_code(dicom_dir, make, code) -> None:
    data = make(dicom_dir)
    with pytest.raises(XrayqError) as caught:
        open_image(data)
    assert caught.value.code == code


def test_garbage_after_the_dicom_preamble_is_refused_as_dicom(dicom_dir) -> None:
    data = read(dicom_dir, "RG3_UNCR")[:132] + b"\x02\x00garbage" * 10
    with pytest.raises(XrayqError) as caught:
        check_image(data)
    assert caught.value.code in ("dicom_unreadable", "dicom_no_pixel_data")


def test_identifying_tags_and_suitability_flags(dicom_dir) -> None:
    from shared.imaging.dicom import identifying_tags, read_header, suitability_warnings

    tags = identifying_tags(read_header(read(dicom_dir, "RG3_UNCR")))
    assert tags["Modality"] == "CR" and tags["BodyPartExamined"] == "EXTREMITY"
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"} <= set(tags)
    chest = {"body_parts": ["CHEST"], "modalities": ["CR", "DX"]}
    assert [w["code"] for w in suitability_warnings(tags, chest)] == ["body_part_mismatch"]
    assert suitability_warnings({**tags, "BodyPartExamined": "chest"}, chest) == []
    assert [w["code"] for w in suitability_warnings({"Modality": "MR"}, chest)] == ["modality_mismatch"]
    assert suitability_warnings(tags, {}) == [] and suitability_warnings(None, chest) == []
