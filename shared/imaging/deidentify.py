"""De-identification of DICOM kept as training data: PS3.15 Annex E Basic Application Level
Confidentiality Profile, with a record of what was done for the dataset manifest.

The attribute table (Table E.1-1: which attributes are removed, emptied, replaced with a dummy, or
get new UIDs) comes from dicom-anonymizer's transcription of the standard (`TABLE_VERSION`); the
actions are ours, because training data needs them *consistent*: UIDs and the patient pseudonym are
keyed hashes (HMAC-style, with the caller's secret) of the originals, so instances of one study still
share a study, images of one patient still share a patient (a split by patient stays possible), and
nothing maps back without the key. Where the table allows a choice (X/Z, X/D, Z/D, X/Z/D, X/Z/U*),
the attribute is kept with an empty or dummy value rather than removed, so the object stays valid
for its IOD. Private attributes are removed. Pixel data is not touched: the basic profile has no
pixel cleaning, so an image that says it has burned-in text is refused rather than passed on.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydicom
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from shared.core.errors import XrayqError
from shared.imaging.dicom import derived_uid

PROFILE = "PS3.15 E.1 Basic Application Level Confidentiality Profile"
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
TABLE_VERSION = "DICOM 2026c Table E.1-1 (dicom-anonymizer)"
METHOD = f"xrayq: {PROFILE}, {TABLE_VERSION}; keyed UIDs and patient pseudonym"

# What each of the standard's action codes becomes here (the keep-the-IOD-valid choice where it offers one).
_CATEGORY_ACTIONS = {
    "X_TAGS": "remove",
    "Z_TAGS": "empty",
    "X_Z_TAGS": "empty",
    "D_TAGS": "dummy",
    "Z_D_TAGS": "dummy",
    "X_D_TAGS": "dummy",
    "X_Z_D_TAGS": "dummy",
    "U_TAGS": "uid",
    "X_Z_U_STAR_TAGS": "uid",
}
_EXACT: dict[tuple[int, int], str] = {}
_MASKED: list[tuple[tuple[int, int, int, int], str]] = []  # repeating groups: (group, element, masks)
for _category, _action in _CATEGORY_ACTIONS.items():
    for _tag in getattr(table, _category):
        if len(_tag) == 2:
            _EXACT[(_tag[0], _tag[1])] = _action
        else:
            _MASKED.append((_tag, _action))

PATIENT_ID = (0x0010, 0x0020)
PATIENT_NAME = (0x0010, 0x0010)
_DUMMY_BY_VR: dict[str, Any] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
    "AE": "ANONYMOUS",
}


@dataclass
class DeidentificationRecord:
    """What was done to one instance: goes into the dataset manifest (no original values, no key)."""

    profile: str = PROFILE
    table: str = TABLE_VERSION
    removed: set[str] = field(default_factory=set)
    emptied: set[str] = field(default_factory=set)
    replaced_with_dummy: set[str] = field(default_factory=set)
    uids_replaced: set[str] = field(default_factory=set)
    pseudonymised: set[str] = field(default_factory=set)  # PatientID / PatientName: the keyed pseudonym
    private_attributes_removed: int = 0
    patient_pseudonym: str = ""

    def as_manifest(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "profile_code": {"value": PROFILE_CODE[0], "scheme": PROFILE_CODE[1], "meaning": PROFILE_CODE[2]},
            "table": self.table,
            "options": [],  # no PS3.15 retention options: dates, descriptions, device identity all go
            "pixel_data": "unchanged (no burned-in annotation declared)",
            "removed": sorted(self.removed),
            "emptied": sorted(self.emptied),
            "replaced_with_dummy": sorted(self.replaced_with_dummy),
            "uids_replaced": sorted(self.uids_replaced),
            "pseudonymised": sorted(self.pseudonymised),
            "private_attributes_removed": self.private_attributes_removed,
            "patient_pseudonym": self.patient_pseudonym,
        }


def deidentify(data: bytes, key: str) -> tuple[bytes, DeidentificationRecord]:
    """A de-identified copy of a Part-10 file, and the record of what was done.

    `key` is the secret of one dataset (or one project): the same key gives the same UIDs and
    pseudonym for the same originals, so related instances stay related.
    """
    if len(key) < 16:
        raise ValueError("the de-identification key must be a secret of at least 16 characters")
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise XrayqError("dicom_unreadable", f"The DICOM file could not be parsed: {exc}") from None
    record = deidentify_dataset(ds, key)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), record


def deidentify_dataset(ds: Dataset, key: str) -> DeidentificationRecord:
    """De-identify `ds` in place (see the module's docstring)."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise XrayqError(
            "dicom_burned_in_annotation",
            "The image declares burned-in annotation; the basic profile cannot clean pixels, so it is not used.",
        )
    record = DeidentificationRecord()
    record.patient_pseudonym = _pseudonym(key, str(ds.get("PatientID", "")) or str(ds.get("PatientName", "")))
    record.private_attributes_removed = _count_private(ds)
    ds.remove_private_tags()
    _apply(ds, key, record)
    if hasattr(ds, "file_meta") and "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD[:64]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = [code]
    return record


def _apply(ds: Dataset, key: str, record: DeidentificationRecord) -> None:
    for element in list(ds):
        tag = (element.tag.group, element.tag.element)
        action = _EXACT.get(tag) or _masked_action(tag)
        name = element.keyword or str(element.tag)
        if action is None:
            if element.VR == "SQ":
                for item in element.value:
                    _apply(item, key, record)
            continue
        _ACTION_FUNCTIONS[action](ds, element, key)
        if tag in (PATIENT_ID, PATIENT_NAME) and action in ("empty", "dummy"):
            record.pseudonymised.add(name)
            continue
        {
            "remove": record.removed,
            "empty": record.emptied,
            "dummy": record.replaced_with_dummy,
            "uid": record.uids_replaced,
        }[action].add(name)


def _masked_action(tag: tuple[int, int]) -> str | None:
    for (group, element, group_mask, element_mask), action in _MASKED:
        if tag[0] & group_mask == group & group_mask and tag[1] & element_mask == element & element_mask:
            return action
    return None


def _remove(ds: Dataset, element: DataElement, key: str) -> None:
    del ds[element.tag]


def _empty(ds: Dataset, element: DataElement, key: str) -> None:
    if (element.tag.group, element.tag.element) in (PATIENT_ID, PATIENT_NAME):
        _patient(ds, element, key)
    elif element.VR == "SQ":
        element.value = Sequence()
    else:
        element.value = None


def _dummy(ds: Dataset, element: DataElement, key: str) -> None:
    if (element.tag.group, element.tag.element) in (PATIENT_ID, PATIENT_NAME):
        _patient(ds, element, key)
    elif element.VR == "SQ":
        element.value = Sequence()
    elif element.VR == "UI":
        _new_uid(ds, element, key)
    elif element.VR == "PN":
        element.value = "ANONYMOUS"
    elif element.VR in _DUMMY_BY_VR:
        element.value = _DUMMY_BY_VR[element.VR]
    elif element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        element.value = b""
    else:
        element.value = "ANONYMIZED"[: 16 if element.VR in ("SH", "CS") else 64]


def _new_uid(ds: Dataset, element: DataElement, key: str) -> None:
    if element.VR != "UI" or not element.value:
        _empty(ds, element, key)
        return
    values = element.value if isinstance(element.value, list | pydicom.multival.MultiValue) else [element.value]
    new = [derived_uid(_pseudonym(key, str(uid))) for uid in values]
    element.value = new if len(new) > 1 else new[0]


def _patient(ds: Dataset, element: DataElement, key: str) -> None:
    source = str(ds.get("PatientID", "")) or str(ds.get("PatientName", ""))
    pseudonym = _pseudonym(key, source)
    element.value = pseudonym if element.VR == "LO" else f"ANON^{pseudonym}"


_ACTION_FUNCTIONS: dict[str, Callable[[Dataset, DataElement, str], None]] = {
    "remove": _remove,
    "empty": _empty,
    "dummy": _dummy,
    "uid": _new_uid,
}


def _pseudonym(key: str, value: str) -> str:
    return hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()[:16].upper()


def _count_private(ds: Dataset) -> int:
    count = 0
    for element in ds:
        if element.tag.is_private:
            count += 1
        elif element.VR == "SQ":
            count += sum(_count_private(item) for item in element.value)
    return count
