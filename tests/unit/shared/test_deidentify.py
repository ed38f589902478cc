"""PS3.15 basic-profile de-identification of the real sample radiographs."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from shared.core.errors import XrayqError
from shared.imaging.deidentify import deidentify

KEY = "dataset-7-deidentification-key"


@pytest.fixture(scope="module")
def samples(data_dir):
    return {name: (data_dir / "dicom" / f"{name}.dcm").read_bytes() for name in ("RG1_UNCR", "RG1_J2KR", "RG3_UNCR")}


def test_identifying_attributes_go_and_pixels_stay(samples) -> None:
    original = pydicom.dcmread(io.BytesIO(samples["RG1_UNCR"]))
    data, record = deidentify(samples["RG1_UNCR"], KEY)
    clean = pydicom.dcmread(io.BytesIO(data))
    for keyword in ("PatientBirthDate", "StudyDate", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        assert not clean.get(keyword), keyword
    assert str(clean.PatientName) != str(original.PatientName) and clean.PatientID != original.PatientID
    assert "InstitutionalDepartmentName" not in clean and "OtherPatientIDs" not in clean
    assert clean.StudyInstanceUID != original.StudyInstanceUID and clean.SOPInstanceUID != original.SOPInstanceUID
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    assert clean.PatientIdentityRemoved == "YES"
    assert clean.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert not any(element.tag.is_private for element in clean)
    assert np.array_equal(clean.pixel_array, original.pixel_array)
    assert clean.Modality == original.Modality and clean.get("BodyPartExamined") == original.get("BodyPartExamined")
    manifest = record.as_manifest()
    assert manifest["profile"].startswith("PS3.15") and "StudyInstanceUID" in manifest["uids_replaced"]
    assert "PatientBirthDate" in manifest["emptied"] and manifest["pseudonymised"] == ["PatientID", "PatientName"]
    assert str(original.PatientID) not in str(manifest)  # the record names attributes, never their values


def test_one_key_keeps_a_study_together_and_another_key_does_not(samples) -> None:
    plain = pydicom.dcmread(io.BytesIO(deidentify(samples["RG1_UNCR"], KEY)[0]))
    j2k = pydicom.dcmread(io.BytesIO(deidentify(samples["RG1_J2KR"], KEY)[0]))
    assert plain.StudyInstanceUID == j2k.StudyInstanceUID and plain.PatientID == j2k.PatientID
    assert plain.SOPInstanceUID != j2k.SOPInstanceUID
    other = pydicom.dcmread(io.BytesIO(deidentify(samples["RG1_UNCR"], "another-dataset-secret-key")[0]))
    assert other.StudyInstanceUID != plain.StudyInstanceUID and other.PatientID != plain.PatientID


def test_burned_in_annotation_is_refused(samples) -> None:
    ds = pydicom.dcmread(io.BytesIO(samples["RG3_UNCR"]))
    ds.BurnedInAnnotation = "YES"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(XrayqError) as caught:
        deidentify(buffer.getvalue(), KEY)
    assert caught.value.code == "dicom_burned_in_annotation"
