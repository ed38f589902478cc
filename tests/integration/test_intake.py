"""One intake over HTTP, against real Postgres, Redis and S3: the same file gets the same answer from
`POST /v1/jobs`, a batch (a file of it, an entry of its ZIP), `/v1/studies`, STOW-RS and a dataset upload."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.routes.dicomweb import CANNOT_UNDERSTAND, FAILURE_REASON
from tests.conftest import ADMIN_HEADERS
from tests.dicom_samples import MULTIFRAME_GREY_BYTE_SC, SECONDARY_CAPTURE, part10, secondary_capture
from tests.unit.intake.test_every_path import BAD_FILES, MAX_FILE_BYTES, bad_file
from tests.unit.intake.test_uploads import make_zip

pytestmark = pytest.mark.integration
STOW_BOUNDARY = "xrayq-intake-boundary"


@pytest.fixture(scope="module")
def limited(services_settings, services_model):
    """The gateway with a 1 MB file limit, so a real CR sample (6 MB) is an oversize file."""
    settings = services_settings.model_copy(update={"max_file_bytes": MAX_FILE_BYTES})
    with TestClient(create_app(settings), headers=ADMIN_HEADERS) as client:
        yield client


def stow(client, *instances: bytes):
    body = b"".join(
        f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n" for data in instances
    )
    return client.post(
        "/dicomweb/studies",
        content=body + f"--{STOW_BOUNDARY}--\r\n".encode(),
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}'},
    )


def batch_job_codes(client, response) -> list[str | None]:
    assert response.status_code == 202, response.text
    jobs = client.get(response.headers["location"]).json()["jobs"]
    return [(job["error"] or {}).get("code") for job in sorted(jobs, key=lambda job: job["position"])]


@pytest.mark.parametrize(("name", "code"), list(BAD_FILES.items()))
def test_the_same_bad_file_gets_the_same_code_on_every_path(limited, data_dir, chest_images, name, code) -> None:
    jpeg = chest_images["NORMAL"][0]
    good, data = jpeg.read_bytes(), bad_file(name, data_dir, jpeg)

    single = limited.post("/v1/jobs", files={"file": (name, data)})
    assert single.status_code >= 400 and single.json()["code"] == code, single.text
    in_batch = limited.post("/v1/batches", files=[("files", ("good.jpeg", good)), ("files", (name, data))])
    assert batch_job_codes(limited, in_batch) == [None, code]
    in_zip = limited.post("/v1/batches", files={"files": ("a.zip", make_zip([("good.jpeg", good), (name, data)]))})
    assert batch_job_codes(limited, in_zip) == [None, code]
    dataset = limited.post(
        "/v1/datasets",
        files={"file": ("d.zip", make_zip([("A/good.jpeg", good), (f"B/{name}", data)]))},
        data={"name": "x"},
    )
    assert dataset.status_code == 422 and dataset.json()["code"] == "dataset_unreadable_files", dataset.text
    assert [(f["path"], f["code"]) for f in dataset.json()["files"]] == [(f"B/{name}", code)]

    study_code = code if name.endswith(".dcm") or not data else "dicom_required"
    study = limited.post("/v1/studies", files={"files": (name, data)})
    assert study.json()["code"] == study_code, study.text
    if data:  # an empty multipart part is no instance at all
        stored = stow(limited, data)
        assert stored.status_code == 409, stored.text
        (failure,) = stored.json()["00081198"]["Value"]
        assert failure["00081197"]["Value"] == [FAILURE_REASON.get(study_code, CANNOT_UNDERSTAND)]


@pytest.mark.parametrize(("sop_class", "frames"), [(SECONDARY_CAPTURE, None), (MULTIFRAME_GREY_BYTE_SC, 1)])
def test_a_film_stored_as_secondary_capture_is_taken_on_every_path(limited, chest_images, sop_class, frames) -> None:
    jpeg = chest_images["PNEUMONIA"][0]

    def film() -> bytes:  # a new instance (new UIDs) each time, as a digitiser sends them
        return part10(secondary_capture(jpeg, sop_class=sop_class, frames=frames))

    single = limited.post("/v1/jobs", files={"file": ("film.dcm", film())})
    assert single.status_code == 202, single.text
    assert batch_job_codes(
        limited, limited.post("/v1/batches", files={"files": ("f.zip", make_zip([("f.dcm", film())]))})
    ) == [None]
    study = limited.post("/v1/studies", files={"files": ("film.dcm", film())})
    assert study.status_code == 202 and study.json()["refused"] == [], study.text
    stored = stow(limited, film())
    assert stored.status_code == 200, stored.text
    dataset = limited.post(
        "/v1/datasets",
        files={"file": ("d.zip", make_zip([("A/1.dcm", film()), ("B/2.dcm", film())]))},
        data={"name": "films"},
    )
    assert dataset.status_code == 201 and dataset.json()["details"]["deidentified_dicom"] == 2, dataset.text
