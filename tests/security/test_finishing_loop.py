"""Finding 2 of the security review: one study that cannot make its report must not stop the finishing
loop for every organisation. Against real Postgres, Redis and the S3 server, with the real worker's
predictor classifying the instances.

The attack: a sender gets an instance without a SOPInstanceUID classified. Intake now refuses it, so
the test also plants it behind intake (straight into study intake, as a stored instance from before
this check would be) to prove the loop itself isolates it: the batch is recorded as failed with a
code, and another organisation's study, arriving after it, completes with its report.
"""

from __future__ import annotations

import io
from datetime import datetime

import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from services.worker.inference import ModelCache, Predictor
from shared.core.errors import XrayqError
from shared.core.storage import S3ObjectStore, make_object_store
from shared.db.models import Batch, as_utc, utcnow
from shared.db.session import database_for
from shared.imaging.dicom import identifying_tags
from shared.intake.instances import check_instance
from shared.intake.upload import Upload
from shared.jobs.deliveries import complete_batch, finish_pass
from shared.jobs.views import COMPLETION, batch_view
from tests.conftest import settings_from_env
from tests.dicom_samples import part10, with_changes
from tests.integration.conftest import add_to_study, client  # noqa: F401  (the real gateway app, for GET /v1/batches)

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(services_env, services_model):
    # Studies are stable at once: the test decides when a pass runs.
    return settings_from_env(services_env, study_stable_after_s=0)


def sample(data_dir, **changes) -> bytes:
    """A real radiograph of a study of its own, with attributes changed (None deletes one)."""
    ds = pydicom.dcmread(data_dir / "dicom" / "RG3_UNCR.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return with_changes(part10(ds), **changes)


def classify(settings, job_ids: list[str]) -> None:
    store = make_object_store(settings)
    predictor = Predictor(settings, database_for(settings), store, ModelCache(store, torch.device("cpu")))
    # At least these: a claim also takes single jobs other tests left waiting in the shared database.
    assert predictor.run(job_ids)["claimed"] >= len(job_ids)


def planted_behind_intake(settings, data: bytes, organisation: str) -> tuple[str, list[str]]:
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return add_to_study(
        settings, Upload("planted.dcm", data, "application/dicom", dicom=identifying_tags(header)), organisation
    )


def test_a_study_that_cannot_make_its_report_fails_alone(settings, data_dir, client) -> None:  # noqa: F811
    bad_data = sample(data_dir, SOPInstanceUID=None)
    with pytest.raises(XrayqError) as refused:
        check_instance("bad.dcm", bad_data, settings)
    assert refused.value.code == "dicom_missing_uid"  # intake refuses it now ...

    bad, bad_jobs = planted_behind_intake(settings, bad_data, "org-mallory")  # ... so plant it behind intake
    good_data = sample(data_dir)
    good, good_jobs = add_to_study(settings, check_instance("good.dcm", good_data, settings), "org-alice")
    classify(settings, bad_jobs + good_jobs)

    database, store = database_for(settings), make_object_store(settings)
    # One batch per pass: before the fix the older, broken study was picked first on every pass and
    # raised, so the other organisation's study never completed.
    for _ in range(200):
        finish_pass(settings, database, store, limit=1)
        with database.session() as session:
            if session.get(Batch, good).completed_at is not None:
                break
    with database.session() as session:
        good_view, bad_view = batch_view(session, good), batch_view(session, bad)
    assert good_view.completed_at is not None and good_view.report is not None and good_view.result_error is None
    report = pydicom.dcmread(io.BytesIO(store.get(f"reports/{good}.dcm")))
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert (
        evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == pydicom.dcmread(io.BytesIO(good_data)).SOPInstanceUID
    )

    assert bad_view.completed_at is not None and bad_view.report is None  # completed without a report: not retried
    assert bad_view.result_error is not None and bad_view.result_error.code == "report_failed"
    assert "SOPInstanceUID" in (bad_view.result_error.detail or "")
    shown = client.get(f"/v1/batches/{bad}").json()
    assert shown["result_error"]["code"] == "report_failed" and shown["report"] is None
    assert COMPLETION not in shown["deliveries"]


def test_type_2_attributes_a_sender_left_out_still_make_a_report(settings, data_dir) -> None:
    # DICOM lets these be empty; a sender that leaves them out made the SR builder raise on every pass.
    left_out = dict.fromkeys(("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID"), None)
    data = sample(data_dir, **left_out, PatientName=None, PatientID=None)
    batch_id, job_ids = add_to_study(settings, check_instance("bare.dcm", data, settings), "org-bare")
    classify(settings, job_ids)
    assert complete_batch(settings, database_for(settings), make_object_store(settings), batch_id)
    report = pydicom.dcmread(io.BytesIO(make_object_store(settings).get(f"reports/{batch_id}.dcm")))
    assert report.PatientBirthDate == "" and report.PatientID == "" and report.StudyInstanceUID


def test_a_completion_that_fails_for_a_passing_reason_is_retried_later_not_first(settings, data_dir) -> None:
    batch_id, job_ids = add_to_study(settings, check_instance("a.dcm", sample(data_dir), settings), "org-bob")
    classify(settings, job_ids)
    database = database_for(settings)
    # Object storage that fails (a bucket that is not there): nothing wrong with the study itself.
    broken = S3ObjectStore(settings.model_copy(update={"s3_bucket": "xrayq-no-such-bucket"}))
    assert complete_batch(settings, database, broken, batch_id) is False
    with database.session() as session:
        batch = session.get(Batch, batch_id)
        state = batch.deliveries[COMPLETION]
        assert batch.result_pending is True and batch.completed_at is None
        assert state["status"] == "pending" and state["attempts"] == 1
        assert as_utc(datetime.fromisoformat(state["next_at"])) > utcnow()
    # Backed off: the next pass does not pick it; tried again with a working store, it completes.
    finish_pass(settings, database, broken)
    with database.session() as session:
        assert session.get(Batch, batch_id).deliveries[COMPLETION]["attempts"] == 1
    assert complete_batch(settings, database, make_object_store(settings), batch_id)
    with database.session() as session:
        view = batch_view(session, batch_id)
    assert view.report is not None and view.result_error is None


# Each way an instance's UIDs can be unusable for its report, refused at intake with its own code.
TOO_LONG = "1." + "2" * 63  # 65 characters
REFUSED_UIDS = [
    ({"SOPInstanceUID": None}, "dicom_missing_uid"),
    ({"SeriesInstanceUID": None}, "dicom_missing_uid"),
    ({"SOPClassUID": None}, "dicom_missing_uid"),  # only the meta header names the class
    ({"StudyInstanceUID": None}, "dicom_missing_study_uid"),
    ({"SOPInstanceUID": TOO_LONG}, "dicom_invalid_uid"),
    ({"SeriesInstanceUID": TOO_LONG}, "dicom_invalid_uid"),
    ({"StudyInstanceUID": TOO_LONG}, "dicom_invalid_uid"),
    ({"SOPInstanceUID": "1.2.840.abc"}, "dicom_invalid_uid"),
    ({"SeriesInstanceUID": "1.2.0840.1"}, "dicom_invalid_uid"),  # a leading zero
    ({"StudyInstanceUID": "1.2..3"}, "dicom_invalid_uid"),  # an empty component
    ({"SOPInstanceUID": "1.2.3."}, "dicom_invalid_uid"),
    ({"StudyInstanceUID": "1.2.3 4"}, "dicom_invalid_uid"),
    ({"AccessionNumber": "A" * 65}, "dicom_invalid_attribute"),
]


@pytest.mark.parametrize(("changes", "code"), REFUSED_UIDS)
def test_instances_with_unusable_uids_are_refused_by_rest(client, data_dir, changes, code) -> None:  # noqa: F811
    response = client.post(
        "/v1/studies", files=[("files", ("x.dcm", sample(data_dir, **changes), "application/dicom"))]
    )
    assert response.status_code == 422 and response.json()["code"] == code, response.text


@pytest.mark.parametrize(("changes", "code"), REFUSED_UIDS)
def test_instances_with_unusable_uids_are_refused_by_stow_rs(client, data_dir, changes, code) -> None:  # noqa: F811
    boundary = "xrayq-security-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + sample(data_dir, **changes)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = client.post(
        "/dicomweb/studies",
        content=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    assert response.status_code == 409, response.text  # nothing stored
    (failed,) = response.json()["00081198"]["Value"]  # FailedSOPSequence
    assert failed["00081197"]["Value"] == [0xC000]  # FailureReason: cannot understand
    assert "X-Xrayq-Batches" not in response.headers
