"""Study batches against real Postgres, Redis and S3: grouping across requests, racing first arrivals,
the stability seal, and a 4xx code of its own for each kind of unusable instance."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest
from pydicom.uid import generate_uid

from shared.core.storage import make_object_store
from shared.db.models import Batch
from shared.db.session import database_for
from shared.intake.instances import check_instance
from shared.jobs.deliveries import finish_pass
from shared.jobs.studies import seal_stable_studies
from shared.jobs.views import batch_view
from tests.conftest import settings_from_env
from tests.integration.conftest import add_to_study

pytestmark = pytest.mark.integration


def instance(data_dir, name: str = "RG3_UNCR.dcm", study_uid: str | None = None, **changes) -> bytes:
    ds = pydicom.dcmread(data_dir / "dicom" / name)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def arrive(settings, data: bytes, organisation: str) -> str:
    """One instance through study intake, as the DICOM receiver does it; its batch id."""
    return add_to_study(settings, check_instance("x.dcm", data, settings), organisation)[0]


def post(client, *files: bytes):
    return client.post(
        "/v1/studies", files=[("files", (f"{i}.dcm", data, "application/dicom")) for i, data in enumerate(files)]
    )


def test_instances_of_one_study_join_one_batch_across_requests(client, data_dir) -> None:
    study = generate_uid()
    first = post(client, instance(data_dir, study_uid=study))
    second = post(client, instance(data_dir, study_uid=study), instance(data_dir))  # + another study
    assert first.status_code == second.status_code == 202, second.text
    (one,) = first.json()["studies"]
    two, other = second.json()["studies"]
    assert one["batch_id"] == two["batch_id"] != other["batch_id"]
    batch = client.get(one["location"]).json()
    assert batch["total"] == 2 and batch["status"] == "collecting" and not batch["study"]["stable"]
    report = client.get(f"{one['location']}/report")
    assert report.status_code == 409 and report.json()["code"] == "report_not_ready"


def test_racing_first_instances_of_a_study_open_one_batch(services_settings, services_model, data_dir) -> None:
    settings, study = services_settings, generate_uid()
    files = [instance(data_dir, study_uid=study) for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        batch_ids = set(pool.map(lambda data: arrive(settings, data, "race"), files))
    assert len(batch_ids) == 1
    with database_for(settings).session() as session:
        view = batch_view(session, batch_ids.pop(), limit=10)
    assert view.total == 6 and sorted(job.position for job in view.jobs) == list(range(6))


def test_a_sealed_study_takes_no_more_instances(services_env, services_model, data_dir) -> None:
    settings = settings_from_env(services_env, study_stable_after_s=0)
    database, study = database_for(settings), generate_uid()
    first = arrive(settings, instance(data_dir, study_uid=study), "seal")
    with database.session() as session:
        assert seal_stable_studies(session, settings) >= 1
    late = arrive(settings, instance(data_dir, study_uid=study), "seal")
    assert late != first  # a late instance opens a new batch of the same study
    finish_pass(settings, database, make_object_store(settings))  # no worker here: its job is still queued
    with database.session() as session:
        assert session.get(Batch, first).completed_at is None


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda d: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 415, "dicom_required"),
        (lambda d: instance(d, SOPClassUID="1.2.840.10008.5.1.4.1.1.2"), 415, "dicom_sop_class_not_supported"),
        (lambda d: instance(d, StudyInstanceUID=None), 422, "dicom_missing_study_uid"),
        (lambda d: instance(d, "CR_tiny_16x16.dcm"), 422, "image_too_small"),
        (lambda d: instance(d)[:5000], 422, "dicom_truncated"),
        (lambda d: instance(d)[:132] + b"\x02\x00garbage" * 10, 422, "dicom_no_pixel_data"),
        (lambda d: instance(d, PhotometricInterpretation="HSV"), 415, "dicom_unsupported_photometric"),
    ],
)
def test_each_unusable_instance_has_its_own_code(client, data_dir, make, status, code) -> None:
    response = post(client, make(data_dir))
    assert response.status_code == status and response.json()["code"] == code, response.text


def test_one_bad_instance_among_good_ones_is_listed_not_fatal(client, data_dir) -> None:
    response = post(client, instance(data_dir), instance(data_dir, "CR_tiny_16x16.dcm"))
    assert response.status_code == 202
    assert [(r["filename"], r["code"]) for r in response.json()["refused"]] == [("1.dcm", "image_too_small")]
