"""A study's result as a DICOM Structured Report (highdicom): TID 1500 Measurement Report.

One measurement group (TID 1501) per classified instance: it references its source image, names the
algorithm (TID 4019: model name and version), and holds the predicted class as its Finding (121071),
the probability of each class, the confidence and uncertainty of the answer as measurements, and every
warning on the input or the answer (outside the intended use, uncertain, ...). The SR joins the
source study (patient and study attributes are copied from the evidence) as a series of its own, so
a PACS files it beside the images. Its UIDs derive from the batch id: rebuilding it after a crash gives
the same instance, never a second one.
"""

from __future__ import annotations

import copy
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import highdicom as hd
import pydicom
from highdicom.enum import PatientSexValues, SpecificCharacterSetValues
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from shared.core.errors import XrayqError
from shared.imaging.dicom import derived_uid, uid_problem

MANUFACTURER = "xrayq"
SR_SERIES_NUMBER = 9901
PRIVATE_SCHEME = "99XRAYQ"  # a local coding scheme (PS3.16 8.2: "99" prefix) for labels without a standard code

# Labels with a standard meaning get SNOMED CT codes; any other label a model brings gets a local one.
_KNOWN_LABELS = {
    "PNEUMONIA": Code("233604007", "SCT", "Pneumonia"),
    "NORMAL": Code("17621005", "SCT", "Normal"),
}
PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
INPUT_WARNING = Code("INPUT-WARNING", PRIVATE_SCHEME, "Warning on the input or the answer")
CONFIDENCE = Code("CONFIDENCE", PRIVATE_SCHEME, "Confidence in the finding (0 to 1)")
UNCERTAINTY = Code("UNCERTAINTY", PRIVATE_SCHEME, "Uncertainty of the finding (0 to 1)")
UNITLESS = Code("1", "UCUM", "no units")


@dataclass
class ClassifiedInstance:
    """One source instance (its header, pixels not needed) and what the model said about it."""

    header: pydicom.Dataset
    label: str
    probabilities: dict[str, float]
    model_name: str
    model_version: int
    warnings: list[dict[str, str]]
    confidence: float | None = None
    uncertainty: float | None = None


def report_uids(batch_id: str) -> tuple[str, str]:
    """(series, instance) UIDs of a batch's SR: the same on every rebuild."""
    return (
        derived_uid("xrayq-sr-series", batch_id),
        derived_uid("xrayq-sr-instance", batch_id),
    )


def label_code(label: str) -> Code:
    known = _KNOWN_LABELS.get(label.upper())
    if known is not None:
        return known
    # Code Value is SH (16 characters): long labels get a stable digest, the meaning keeps the label.
    value = label if len(label) <= 16 else hashlib.sha256(label.encode()).hexdigest()[:16]
    return Code(value, PRIVATE_SCHEME, label[:64])


def warning_code(warning: dict[str, str]) -> hd.sr.CodedConcept:
    """A result's flag as a coded value: its code whole (a code longer than Code Value's 16 characters
    goes into Long Code Value, PS3.3 8.8), the sentence as the meaning (at most 64 characters)."""
    return hd.sr.CodedConcept(warning["code"][:64], PRIVATE_SCHEME, warning["detail"][:64])


def _probability_code(label: str) -> Code:
    value = f"P-{label}"
    if len(value) > 16:
        value = "P-" + hashlib.sha256(label.encode()).hexdigest()[:14]
    return Code(value, PRIVATE_SCHEME, f"Probability of {label}"[:64])


def build_report(batch_id: str, instances: list[ClassifiedInstance]) -> tuple[bytes, str]:
    """The SR as Part-10 bytes, and its SOP Instance UID. `instances` must be of one study.

    Raises `report_failed` (never anything else) when the instances cannot make a report, so the
    caller can record why on the batch instead of failing again on every pass."""
    if not instances:
        raise ValueError("a report needs at least one classified instance")
    try:
        checked = [replace(item, header=evidence_header(item.header)) for item in instances]
        return _build(batch_id, checked)
    except XrayqError:
        raise
    except Exception as exc:  # highdicom and pydicom raise many types on odd data; none may escape
        detail = f"The structured report could not be built: {type(exc).__name__}: {exc}"
        raise XrayqError("report_failed", detail[:500]) from None


def _build(batch_id: str, instances: list[ClassifiedInstance]) -> tuple[bytes, str]:
    series_uid, instance_uid = report_uids(batch_id)
    groups = [_measurement_group(batch_id, index, item) for index, item in enumerate(instances)]
    first = instances[0]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("xrayq-device", first.model_name),
        name=f"xrayq {first.model_name}"[:64],
        manufacturer_name=MANUFACTURER,
        model_name=first.model_name[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    content = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=PROCEDURE, imaging_measurements=groups
    )
    versions = sorted({f"{item.model_name} {item.model_version}" for item in instances})
    sr = hd.sr.ComprehensiveSR(
        evidence=[item.header for item in instances],
        content=content[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="xrayq AI classification",
        manufacturer_model_name=first.model_name[:64],
        software_versions=versions,
    )
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), instance_uid


def _measurement_group(
    batch_id: str, index: int, item: ClassifiedInstance
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    header = item.header
    algorithm = hd.sr.AlgorithmIdentification(name=item.model_name[:64], version=str(item.model_version))
    evaluations = [hd.sr.QualitativeEvaluation(INPUT_WARNING, warning_code(w)) for w in item.warnings]
    measurements = [
        hd.sr.Measurement(
            name=_probability_code(label), value=float(probability), unit=UNITLESS, algorithm_id=algorithm
        )
        for label, probability in item.probabilities.items()
    ]
    measurements += [
        hd.sr.Measurement(name=name, value=float(value), unit=UNITLESS, algorithm_id=algorithm)
        for name, value in ((CONFIDENCE, item.confidence), (UNCERTAINTY, item.uncertainty))
        if value is not None
    ]
    sop_instance = str(header.SOPInstanceUID)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("xrayq-tracking", batch_id, sop_instance),
            identifier=f"instance {index + 1}",
        ),
        finding_type=label_code(item.label),  # TID 1501 "Finding" (121071): the predicted class
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(header.SOPClassUID), sop_instance)],
    )


# What the SR copies from its first source instance (PS3.3 C.7.1.1, C.7.2.1): type 2 attributes, which
# DICOM lets be empty -- and so a sender may leave out or fill with a value highdicom refuses.
_TYPE_2_TEXT = ("PatientName", "PatientID", "AccessionNumber", "StudyID", "ReferringPhysicianName")
_TYPE_2_CHECKED: dict[str, Callable[[Any], object]] = {
    "PatientBirthDate": DA,
    "StudyDate": DA,
    "StudyTime": TM,
    "PatientSex": lambda value: PatientSexValues(value) if value else None,
}
# The UIDs the SR references an instance by (type 1): without them there is nothing to reference.
_EVIDENCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def evidence_header(header: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of a source instance's header that the SR can cite: type 2 attributes that are missing
    or unusable become empty, an unknown character set is dropped; a missing or malformed UID is
    `report_failed`."""
    for keyword in _EVIDENCE_UIDS:
        value = str(header.get(keyword, "") or "")
        problem = uid_problem(value) if value else "is missing"
        if problem is not None:
            raise XrayqError(
                "report_failed", f"Instance {header.get('SOPInstanceUID') or '?'!s:.64}: {keyword} {problem}."
            )
    cited = copy.deepcopy(header)
    for keyword in _TYPE_2_TEXT:
        if keyword not in cited:
            setattr(cited, keyword, "")
    for keyword, check in _TYPE_2_CHECKED.items():
        try:
            check(cited.get(keyword, ""))
        except (ValueError, TypeError):
            setattr(cited, keyword, "")
        if keyword not in cited:
            setattr(cited, keyword, "")
    charsets = cited.get("SpecificCharacterSet")
    if charsets is not None:
        try:
            for charset in [charsets] if isinstance(charsets, str) else list(charsets):
                SpecificCharacterSetValues(charset)
        except ValueError:
            del cited.SpecificCharacterSet
    return cited
