"""DICOM instances made from the real samples in ../shared/data, for tests of every intake path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_GREY_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def secondary_capture(
    jpeg: Path, *, sop_class: str = SECONDARY_CAPTURE, study_uid: str | None = None, frames: int | None = None
) -> Dataset:
    """A real chest film as a digitiser stores it: a Secondary Capture (Modality OT, ConversionType DF)
    of the JPEG's grey pixels. `frames` writes NumberOfFrames (the multi-frame SC classes need it)."""
    grey = np.asarray(Image.open(jpeg).convert("L"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "SC-TEST", "Test^Secondary^Capture"
    ds.Modality, ds.ConversionType, ds.BodyPartExamined = "OT", "DF", "CHEST"
    # The type 2 attributes of the SC IOD's patient, study, series and image modules: present, may be empty.
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName"):
        setattr(ds, keyword, "")
    for keyword in ("StudyID", "AccessionNumber", "SeriesNumber", "InstanceNumber", "PatientOrientation"):
        setattr(ds, keyword, "")
    pixels = np.stack([grey] * frames) if frames else grey
    ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    if frames:
        ds.NumberOfFrames = frames
    return ds


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def with_changes(data: bytes, **changes: object) -> bytes:
    """A Part-10 instance with attributes changed (None deletes one), pixels untouched."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return part10(ds)
