"""The same file gets the same answer from every intake path: a job's file, a batch's ZIP entry, a
study instance (REST, STOW-RS, C-STORE), a dataset member. Real samples from ../shared/data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from services.dicom.receiver import make_ae
from shared.core.settings import Settings
from shared.intake.images import check_dataset_member, check_file
from shared.intake.instances import accepted_instances, check_instance
from shared.intake.sop_classes import ACCEPTED_SOP_CLASSES
from shared.intake.uploads import expand_zip
from shared.training.datasets import read_upload
from tests.conftest import png_bytes
from tests.dicom_samples import (
    CT_IMAGE_STORAGE,
    MULTIFRAME_GREY_BYTE_SC,
    SECONDARY_CAPTURE,
    part10,
    secondary_capture,
    with_changes,
)
from tests.unit.intake.test_uploads import make_zip

MAX_FILE_BYTES = 1_000_000  # the CR samples (6-7 MB) are over it; the chest JPEGs and their SCs are not


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, max_file_bytes=MAX_FILE_BYTES)


@pytest.fixture(scope="module")
def chest_jpeg(chest_images) -> Path:
    return chest_images["NORMAL"][0]


def codes_on_every_path(name: str, data: bytes, good: bytes, settings: Settings) -> dict[str, str | None]:
    """path -> the code the file got there (None: accepted)."""
    upload = check_file(name, data, settings)
    entry = list(expand_zip(make_zip([("good.jpeg", good), (name, data)]), settings))[1]
    dataset = read_upload(
        io.BytesIO(make_zip([("A/good.jpeg", good), (f"B/{name}", data)])), settings, skip_unreadable=True, classes=None
    )
    skipped = {item["path"]: item["code"] for item in dataset.details["skipped_unreadable"]}
    refused: list = []
    list(accepted_instances([(name, data)], settings, refused))
    return {
        "job": upload.error.code if upload.error else None,
        "zip_entry": entry.error.code if entry.error else None,
        "dataset_member": skipped.get(f"B/{name}"),
        "study_instance": refused[0].error.code if refused else None,
    }


def bad_file(name: str, data_dir: Path, chest_jpeg: Path) -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, size=(256, 256), dtype=np.uint8)
    sc = part10(secondary_capture(chest_jpeg))
    return {
        "truncated.png": lambda: png_bytes(noise)[:30_000],
        "not-an-image.png": lambda: b"%PDF-1.7 not an image at all",
        "empty.png": lambda: b"",
        "oversize.dcm": lambda: (data_dir / "dicom" / "RG3_UNCR.dcm").read_bytes(),
        "no-pixels.dcm": lambda: with_changes(sc, PixelData=None),
        "ct.dcm": lambda: with_changes(sc, SOPClassUID=CT_IMAGE_STORAGE),
        "two-frames.dcm": lambda: part10(secondary_capture(chest_jpeg, sop_class=MULTIFRAME_GREY_BYTE_SC, frames=2)),
        "cut.dcm": lambda: sc[:20_000],
    }[name]()


BAD_FILES = {
    "truncated.png": "image_unreadable",
    "not-an-image.png": "unsupported_media_type",
    "empty.png": "empty_file",
    "oversize.dcm": "file_too_large",
    "no-pixels.dcm": "dicom_no_pixel_data",
    "ct.dcm": "dicom_sop_class_not_supported",
    "two-frames.dcm": "dicom_multiframe",
    "cut.dcm": "dicom_truncated",
}


@pytest.mark.parametrize(("name", "code"), list(BAD_FILES.items()))
def test_the_same_bad_file_gets_the_same_code_on_every_path(settings, data_dir, chest_jpeg, name, code) -> None:
    data = bad_file(name, data_dir, chest_jpeg)
    codes = codes_on_every_path(name, data, chest_jpeg.read_bytes(), settings)
    # Study intake takes DICOM only: any other file is `dicom_required` there (an empty one is `empty_file`).
    study = code if name.endswith(".dcm") or not data else "dicom_required"
    assert codes == {"job": code, "zip_entry": code, "dataset_member": code, "study_instance": study}


@pytest.mark.parametrize(
    ("sop_class", "frames"),
    [(SECONDARY_CAPTURE, None), (MULTIFRAME_GREY_BYTE_SC, 1), ("1.2.840.10008.5.1.4.1.1.1", None)],
)
def test_a_film_as_secondary_capture_is_taken_on_every_path(settings, chest_jpeg, sop_class, frames) -> None:
    data = part10(secondary_capture(chest_jpeg, sop_class=sop_class, frames=frames))
    assert codes_on_every_path("film.dcm", data, chest_jpeg.read_bytes(), settings) == dict.fromkeys(
        ("job", "zip_entry", "dataset_member", "study_instance")
    )
    job, instance = check_file("film.dcm", data, settings), check_instance("film.dcm", data, settings)
    assert job.media_type == instance.media_type == "application/dicom"
    assert job.dicom == instance.dicom and job.dicom is not None
    assert job.dicom["Modality"] == "OT" and job.dicom["BodyPartExamined"] == "CHEST"
    assert check_dataset_member("film.dcm", data, settings) == "application/dicom"


def test_the_sop_class_of_the_meta_header_stands_in_for_a_missing_one(settings, chest_jpeg) -> None:
    data = with_changes(part10(secondary_capture(chest_jpeg)), SOPClassUID=None)
    upload = check_file("film.dcm", data, settings)
    assert upload.error is None and upload.media_type == "application/dicom"


def test_the_receiver_negotiates_every_accepted_class_and_no_other(settings) -> None:
    contexts = {str(context.abstract_syntax) for context in make_ae(settings).supported_contexts}
    assert set(ACCEPTED_SOP_CLASSES) <= contexts
    assert SECONDARY_CAPTURE in contexts and CT_IMAGE_STORAGE not in contexts
