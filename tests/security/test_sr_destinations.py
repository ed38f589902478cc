"""Finding 4: results go only where their organisation sends them. Two organisations, each with its own
PACS (real pynetdicom C-STORE SCPs on loopback) registered through `/v1/sr-destinations`, send studies
through a real `xrayq dicom` process (org-a's modality at 127.0.0.1, org-b's at 127.0.0.2) and through
the REST API with their own keys; the real worker step classifies them and the real finishing pass
builds and sends the reports. No report reaches another organisation's PACS -- not even when org-b
sends a copy of org-a's study, UIDs and patient included -- and no tenant sees a PACS address."""

from __future__ import annotations

import io

import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import select

from services.gateway.app import create_app
from services.worker.inference import ModelCache, Predictor
from shared.core.storage import make_object_store
from shared.db.models import Job
from shared.db.session import database_for
from shared.jobs.deliveries import complete_batch, deliver_due, finish_pass, gateway_dispatcher
from shared.jobs.studies import seal_stable_studies, study_batch_ids
from tests.conftest import ADMIN_HEADERS
from tests.e2e.conftest import SrReceiver
from tests.security.dicom_receivers import associate, running_receiver

pytestmark = pytest.mark.integration
ALLOW_LIST = "MOD-A@127.0.0.1:org-a,MOD-B@127.0.0.2:org-b"
SOURCES = {"org-a": ("MOD-A", "127.0.0.1"), "org-b": ("MOD-B", "127.0.0.2")}


class Pacs(SrReceiver):
    def __init__(self, ae_title: str) -> None:
        self.ae_title = ae_title
        super().__init__()

    def report_uids(self) -> set[str]:
        return {str(ds.SOPInstanceUID) for ds in self.received}


@pytest.fixture(scope="module")
def pacs():
    receivers = {"org-a": Pacs("PACS-A"), "org-b": Pacs("PACS-B"), "org-c": Pacs("PACS-C")}
    yield receivers
    for receiver in receivers.values():
        receiver.close()


@pytest.fixture(scope="module")
def settings(services_settings, pacs):
    # The configured destination serves org-c only: org-a and org-b never get it either.
    return services_settings.model_copy(
        update={
            "study_stable_after_s": 0,
            "dicom_sr_destination": pacs["org-c"].address,
            "dicom_sr_organisation": "org-c",
            "delivery_retry_after_s": 0.1,
        }
    )


@pytest.fixture(scope="module")
def gateway(settings, services_model, pacs):
    # The tests run the finishing passes themselves, each step when they mean it.
    quiet = settings.model_copy(update={"study_check_interval_s": 3600})
    with TestClient(create_app(quiet), headers=ADMIN_HEADERS) as client:
        for organisation in ("org-a", "org-b"):
            receiver = pacs[organisation]
            created = client.post(
                "/v1/sr-destinations",
                json={
                    "organisation": organisation,
                    "name": f"{organisation}-pacs",
                    "ae_title": receiver.ae_title,
                    "host": "127.0.0.1",
                    "port": receiver.port,
                },
            )
            assert created.status_code == 201, created.text
        yield client


@pytest.fixture(scope="module")
def keys(gateway) -> dict[str, dict[str, str]]:
    """A submit key of each organisation, as request headers."""
    headers = {}
    for organisation in ("org-a", "org-b"):
        key = gateway.post(
            "/v1/api-keys", json={"name": f"{organisation}-ris", "organisation": organisation, "roles": ["submit"]}
        ).json()["key"]
        headers[organisation] = {"Authorization": f"Bearer {key}"}
    return headers


@pytest.fixture(scope="module")
def receiver(services_env, settings, services_model, tmp_path_factory):
    env = {**services_env, "XRAYQ_DICOM_ALLOWED_AE_TITLES": ALLOW_LIST}
    with running_receiver(env, tmp_path_factory, probe="MOD-A") as running:
        yield running


def instances(data_dir, study_uid: str, patient_id: str, count: int = 2) -> list[pydicom.Dataset]:
    found = []
    for _ in range(count):
        ds = pydicom.dcmread(data_dir / "dicom" / "RG1_UNCR.dcm")
        ds.StudyInstanceUID, ds.PatientID = study_uid, patient_id
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        found.append(ds)
    return found


def c_store(receiver, organisation: str, datasets: list[pydicom.Dataset]) -> list[int]:
    calling, source = SOURCES[organisation]
    contexts = tuple((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets[:1])
    assoc = associate(receiver, calling=calling, source=source, contexts=contexts)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def classify(settings, batch_ids: list[str]) -> None:
    """The worker's step on the batches' jobs."""
    database, store = database_for(settings), make_object_store(settings)
    with database.session() as session:
        job_ids = list(session.scalars(select(Job.id).where(Job.batch_id.in_(batch_ids))))
    Predictor(settings, database, store, ModelCache(store, torch.device("cpu"))).run(job_ids)


def classify_and_finish(settings, batch_ids: list[str]) -> None:
    """The worker's step, then the finishing pass: seal, report, start the deliveries -- and wait for
    them: the gateway's dispatcher sends them on threads of its own."""
    classify(settings, batch_ids)
    database, store = database_for(settings), make_object_store(settings)
    finish_pass(settings, database, store)
    assert gateway_dispatcher(settings, database, store).wait_idle(60)


def batches_of(settings, study_uid: str, organisation: str) -> list[str]:
    with database_for(settings).session() as session:
        return study_batch_ids(session, study_uid, organisation)


def test_each_organisations_reports_reach_only_its_own_pacs(gateway, keys, receiver, settings, pacs, data_dir) -> None:
    # org-a's study arrives by C-STORE; org-b, over its own allowed association, sends a copy of it --
    # same StudyInstanceUID, same patient -- hoping its report (or a rewrite of org-a's) reaches PACS-A.
    study, patient = generate_uid(), "PAT-OF-ORG-A"
    assert c_store(receiver, "org-a", instances(data_dir, study, patient)) == [0, 0]
    assert c_store(receiver, "org-b", instances(data_dir, study, patient)) == [0, 0]
    # And each organisation submits a study over REST with its own key.
    rest = {}
    for organisation in ("org-a", "org-b"):
        uid = generate_uid()
        files = [
            ("files", (f"{i}.dcm", part10(ds), "application/dicom"))
            for i, ds in enumerate(instances(data_dir, uid, organisation))
        ]
        response = gateway.post("/v1/studies", files=files, headers=keys[organisation])
        assert response.status_code == 202, response.text
        rest[organisation] = response.json()["studies"][0]["batch_id"]

    by_organisation = {
        organisation: [*batches_of(settings, study, organisation), rest[organisation]]
        for organisation in ("org-a", "org-b")
    }
    assert all(len(ids) == 2 for ids in by_organisation.values())  # org-b's copy did not join org-a's batch
    classify_and_finish(settings, [batch for ids in by_organisation.values() for batch in ids])

    reports = {}
    for organisation, batch_ids in by_organisation.items():
        for batch_id in batch_ids:
            batch = gateway.get(f"/v1/batches/{batch_id}").json()
            assert batch["status"] == "succeeded", batch
            assert set(batch["deliveries"]) == {f"sr_store:{organisation}-pacs"}, batch["deliveries"]
            assert batch["deliveries"][f"sr_store:{organisation}-pacs"]["status"] == "delivered"
            reports.setdefault(organisation, set()).add(batch["report"]["sop_instance_uid"])
    assert pacs["org-a"].report_uids() == reports["org-a"]
    assert pacs["org-b"].report_uids() == reports["org-b"]
    assert pacs["org-c"].received == []  # the configured destination is org-c's alone
    assert {str(ds.PatientID) for ds in pacs["org-a"].received} == {patient, "org-a"}


def test_no_tenant_sees_a_pacs_address(gateway, keys, receiver, settings, pacs, data_dir) -> None:
    study = generate_uid()
    assert c_store(receiver, "org-b", instances(data_dir, study, "PAT-B", count=1)) == [0]
    (batch_id,) = batches_of(settings, study, "org-b")
    classify_and_finish(settings, [batch_id])

    own = gateway.get(f"/v1/batches/{batch_id}", headers=keys["org-b"])
    assert own.status_code == 200
    delivery = own.json()["deliveries"]["sr_store:org-b-pacs"]
    assert delivery["status"] == "delivered" and delivery["target"] == "org-b-pacs"
    for address in ("127.0.0.1", str(pacs["org-b"].port), pacs["org-b"].ae_title):
        assert address not in own.text
    assert gateway.get(f"/v1/batches/{batch_id}", headers=keys["org-a"]).status_code == 404
    for organisation in ("org-a", "org-b"):
        listing = gateway.get("/v1/sr-destinations", headers=keys[organisation])
        assert listing.status_code == 403 and listing.json()["code"] == "forbidden"
        made = gateway.post(
            "/v1/sr-destinations",
            headers=keys[organisation],
            json={"organisation": organisation, "name": "mine", "ae_title": "X", "host": "127.0.0.1", "port": 1},
        )
        assert made.status_code == 403
    admin_view = {row["name"]: row for row in gateway.get("/v1/sr-destinations").json()}
    assert admin_view["org-b-pacs"]["port"] == pacs["org-b"].port  # admins manage the addresses


def test_a_destination_removed_before_sending_receives_nothing(gateway, keys, settings, pacs, data_dir) -> None:
    made = gateway.post(
        "/v1/sr-destinations",
        json={
            "organisation": "org-a",
            "name": "old-pacs",
            "ae_title": "PACS-C",
            "host": "127.0.0.1",
            "port": pacs["org-c"].port,
        },
    )
    assert made.status_code == 201
    duplicate = gateway.post("/v1/sr-destinations", json={**made.json(), "ae_title": "OTHER"})
    assert duplicate.status_code == 409 and duplicate.json()["code"] == "sr_destination_exists"
    files = [
        ("files", ("0.dcm", part10(ds), "application/dicom")) for ds in instances(data_dir, generate_uid(), "P", 1)
    ]
    batch_id = gateway.post("/v1/studies", files=files, headers=keys["org-a"]).json()["studies"][0]["batch_id"]
    classify(settings, [batch_id])
    database, store = database_for(settings), make_object_store(settings)
    with database.session() as session:
        seal_stable_studies(session, settings)
    assert complete_batch(settings, database, store, batch_id)  # the report is made, to go to both
    assert gateway.delete(f"/v1/sr-destinations/{made.json()['id']}").status_code == 200
    deliver_due(settings, database, store)
    assert gateway_dispatcher(settings, database, store).wait_idle(60)  # deliveries run on its threads

    deliveries = gateway.get(f"/v1/batches/{batch_id}").json()["deliveries"]
    assert deliveries["sr_store:org-a-pacs"]["status"] == "delivered"
    assert deliveries["sr_store:old-pacs"]["status"] == "pending"  # retried, then failed: never redirected
    assert "removed" in deliveries["sr_store:old-pacs"]["last_error"]
    assert pacs["org-c"].received == []
    gone = gateway.delete(f"/v1/sr-destinations/{made.json()['id']}")
    assert gone.status_code == 404 and gone.json()["code"] == "sr_destination_not_found"
