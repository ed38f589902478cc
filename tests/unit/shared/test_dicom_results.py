"""Pieces of the DICOM result path that need no network: SR building, callback signatures, AE addresses."""

from __future__ import annotations

import io

import highdicom as hd
import pydicom
import pytest

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.imaging.dimse import decodable_transfer_syntaxes, parse_remote_ae
from shared.imaging.reports import ClassifiedInstance, build_report, label_code
from shared.jobs.callbacks import check_callback, organisation_secret, signature, verify_signature


def headers(data_dir, *names: str) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(data_dir / "dicom" / f"{name}.dcm", stop_before_pixels=True) for name in names]


def test_report_is_the_same_instance_when_rebuilt_and_references_its_sources(data_dir) -> None:
    sources = headers(data_dir, "RG1_UNCR", "RG1_J2KR")
    items = [
        ClassifiedInstance(h, "PNEUMONIA", {"NORMAL": 0.25, "PNEUMONIA": 0.75}, "chest-xray", 4, []) for h in sources
    ]
    first, uid = build_report("batch-1", items)
    again, same_uid = build_report("batch-1", items)
    _, other_uid = build_report("batch-2", items)
    assert uid == same_uid != other_uid
    sr = pydicom.dcmread(io.BytesIO(first))
    assert sr.SOPInstanceUID == uid == pydicom.dcmread(io.BytesIO(again)).SOPInstanceUID
    referenced = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {h.SOPInstanceUID for h in sources}
    assert sr.PatientID == sources[0].PatientID and sr.StudyInstanceUID == sources[0].StudyInstanceUID


def test_confidence_uncertainty_and_every_warning_are_in_the_report(data_dir) -> None:
    (source,) = headers(data_dir, "RG1_UNCR")
    warnings = [{"code": "uncertain", "detail": "Uncertain answer (uncertainty 0.80, threshold 0.40)."}]
    item = ClassifiedInstance(
        source, "PNEUMONIA", {"NORMAL": 0.3, "PNEUMONIA": 0.7}, "chest-xray", 4, warnings, confidence=0.7,
        uncertainty=0.8,
    )  # fmt: skip
    document = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(io.BytesIO(build_report("batch-3", [item])[0])))
    (group,) = document.content.get_image_measurement_groups()
    values = {m.name.value: m.value for m in group.get_measurements()}
    assert values == {"P-NORMAL": 0.3, "P-PNEUMONIA": 0.7, "CONFIDENCE": 0.7, "UNCERTAINTY": 0.8}
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.value.value == "uncertain"
    # A result without them (a version with no uncertainty threshold) has the probabilities alone.
    plain = ClassifiedInstance(source, "NORMAL", {"NORMAL": 0.9, "PNEUMONIA": 0.1}, "chest-xray", 4, [])
    document = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(io.BytesIO(build_report("batch-4", [plain])[0])))
    (group,) = document.content.get_image_measurement_groups()
    assert {m.name.value for m in group.get_measurements()} == {"P-NORMAL", "P-PNEUMONIA"}


def test_labels_get_standard_codes_where_known() -> None:
    assert label_code("PNEUMONIA").scheme_designator == "SCT"
    local = label_code("Parasitized-with-a-long-label-name")
    assert local.scheme_designator == "99XRAYQ" and len(local.value) <= 16


def test_callback_signature_fails_on_any_change() -> None:
    body = b'{"batch":{"status":"succeeded"}}'
    header = signature("s" * 20, 1_700_000_000, body)
    assert verify_signature("s" * 20, header, body, now=1_700_000_010)
    assert not verify_signature("s" * 20, header, body + b" ", now=1_700_000_010)
    assert not verify_signature("t" * 20, header, body, now=1_700_000_010)
    assert not verify_signature("s" * 20, header, body, now=1_700_000_000 + 3600)  # a replay, an hour later


def test_callback_registration_needs_a_url_and_a_secret() -> None:
    settings = Settings()
    assert check_callback(None, None, settings, "org") == (None, None)
    assert check_callback("https://8.8.8.8/hook", "x" * 16, settings, "org") == ("https://8.8.8.8/hook", "x" * 16)
    for url, secret in (("ftp://8.8.8.8/hook", "x" * 16), ("https://8.8.8.8/hook", None), (None, "x" * 16)):
        with pytest.raises(XrayqError) as caught:
            check_callback(url, secret, settings, "org")
        assert caught.value.code in ("invalid_callback", "callback_destination_refused")
    # No secret of the request's own: signed with the organisation's, derived when it is sent.
    server_secret = Settings(callback_secret="y" * 32)
    assert check_callback("https://8.8.8.8/hook", None, server_secret, "org") == ("https://8.8.8.8/hook", None)
    assert organisation_secret(server_secret, "org") not in (None, "y" * 32, organisation_secret(server_secret, "o2"))
    with pytest.raises(XrayqError) as caught:
        check_callback("https://10.0.0.5/hook", None, server_secret, "org")  # a private address
    assert caught.value.code == "callback_destination_refused"


def test_ae_addresses_and_negotiated_syntaxes() -> None:
    remote = parse_remote_ae("PACS_MAIN@pacs.hospital.local:104")
    assert (remote.ae_title, remote.host, remote.port) == ("PACS_MAIN", "pacs.hospital.local", 104)
    for text in ("PACS@host", "@host:104", "PACS@host:70000"):
        with pytest.raises(XrayqError):
            parse_remote_ae(text)
    syntaxes = decodable_transfer_syntaxes()
    assert "1.2.840.10008.1.2.4.90" in syntaxes and "1.2.840.10008.1.2.5" in syntaxes  # JPEG 2000, RLE
