"""Finding 1 of issue 12, performed against the real stack: one organisation's `train` key tries to take
over the models other organisations' images are classified with.

The real gateway app in-process over real Postgres, Redis and the S3 server; training runs executed by
the trainer's own `execute_run`, as tests/integration/test_training_runs.py does. Hospital A owns
`a-model`; hospital B holds keys with every non-admin role; `chest-xray` is the shared starter model.
"""

from __future__ import annotations

import io
import platform
import zipfile

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from services.gateway.app import create_app
from services.trainer.runs import execute_run
from shared.core.queue import make_celery
from shared.core.storage import make_object_store
from shared.db.models import ModelActivation, ModelVersion, RegisteredModel, TrainingRun
from shared.db.session import database_for
from shared.intake.upload import Upload
from shared.jobs.creation import JobRequest, create_jobs
from tests.conftest import ADMIN_HEADERS
from tests.integration.test_gateway_api import problem

pytestmark = pytest.mark.integration

TINY_RUN = {"architecture": "mobilenet_v3_small", "image_size": 64, "epochs": 1, "batch_size": 16}
ROLES = ["submit", "train"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chest_zip(chest_images, train: slice, test: slice, *, swap_labels: bool = False) -> bytes:
    """train/CLASS/ and test/CLASS/ folders of real chest X-rays; `swap_labels` files each under the other class."""
    other = {"NORMAL": "PNEUMONIA", "PNEUMONIA": "NORMAL"}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for label, paths in chest_images.items():
            folder = other[label] if swap_labels else label
            for split, part in (("train", train), ("test", test)):
                for path in paths[part]:
                    archive.writestr(f"{split}/{folder}/{path.name}", path.read_bytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(services_settings, services_model):
    with TestClient(create_app(services_settings), headers=ADMIN_HEADERS) as test_client:
        yield test_client


def create_keys(client, wanted: list[tuple[str, str, list[str]]]) -> dict[str, dict[str, str]]:
    """(name, organisation, roles) -> each key's `headers` and `id`, made by the admin."""
    made = {}
    for name, organisation, roles in wanted:
        response = client.post("/v1/api-keys", json={"name": name, "organisation": organisation, "roles": roles})
        assert response.status_code == 201, response.text
        made[name] = {"headers": bearer(response.json()["key"]), "id": response.json()["id"]}
    return made


@pytest.fixture(scope="module")
def keys(client) -> dict[str, dict[str, str]]:
    """Two hospitals' keys (every role but admin), a second scientist at A, and an admin key of A."""
    return create_keys(
        client,
        [
            ("a", "hospital-a", ROLES),
            ("a2", "hospital-a", ["train"]),
            ("b", "hospital-b", ROLES),
            ("a-admin", "hospital-a", ["admin"]),
        ],
    )


def upload_dataset(client, headers, data: bytes, name: str) -> dict:
    response = client.post(
        "/v1/datasets", files={"file": ("data.zip", data, "application/zip")}, data={"name": name}, headers=headers
    )
    assert response.status_code == 201, response.text
    return response.json()


def start_run(client, headers, **fields):
    return client.post("/v1/training-runs", json={**TINY_RUN, **fields}, headers=headers)


@pytest.fixture(scope="module")
def a_model(client, keys, chest_images, services_settings) -> dict:
    """Hospital A's own model: its first version, trained on A's data, active; A's test split its yardstick."""
    a = keys["a"]["headers"]
    dataset = upload_dataset(client, a, chest_zip(chest_images, slice(0, 16), slice(16, 24)), "a-chest")
    response = start_run(client, a, dataset=dataset["id"], model_name="a-model", promotion="if_none_active")
    assert response.status_code == 202, response.text
    assert execute_run(services_settings, response.json()["id"]) is not None
    run = client.get(f"/v1/training-runs/{response.json()['id']}", headers=a).json()
    assert run["status"] == "succeeded" and run["model"] == {"name": "a-model", "version": 1}, run
    return {"dataset": dataset, "run": run}


@pytest.fixture(scope="module")
def b_dataset(client, keys, chest_images) -> dict:
    return upload_dataset(client, keys["b"]["headers"], chest_zip(chest_images, slice(0, 12), slice(12, 16)), "b-chest")


def model_state(settings, name: str) -> tuple[list[tuple[int, bool]], int]:
    """(version, active) per version of `name`, and how many activations it has."""
    with database_for(settings).session() as session:
        versions = session.execute(
            select(ModelVersion.version, ModelVersion.is_active).where(ModelVersion.name == name).order_by("version")
        ).all()
        activations = session.scalar(select(func.count()).where(ModelActivation.name == name))
        return [tuple(row) for row in versions], activations or 0


def test_the_first_version_makes_its_organisation_the_owner(client, keys, a_model, services_settings) -> None:
    with database_for(services_settings).session() as session:
        model = session.get(RegisteredModel, "a-model")
        assert model is not None and model.owner == "hospital-a"
        assert model.evaluation_set["dataset_id"] == a_model["dataset"]["id"]
        assert model.evaluation_set["split"] == "test" and model.evaluation_set["n"] == 16
        starter = session.get(RegisteredModel, "chest-xray")
        assert starter is not None and starter.owner is None  # registered by the local admin: shared
    listed = {m["name"]: m for m in client.get("/v1/models", headers=keys["a"]["headers"]).json()}
    assert listed["a-model"]["owner"] == "hospital-a" and listed["chest-xray"]["owner"] is None


def test_another_organisation_cannot_promote_or_roll_back_a_model(client, keys, a_model, services_settings) -> None:
    b = keys["b"]["headers"]
    for name in ("a-model", "chest-xray"):
        before = model_state(services_settings, name)
        problem(client.post(f"/v1/models/{name}/versions/1/promote", headers=b), 403, "model_not_owned")
        problem(client.post(f"/v1/models/{name}/promote", json={"version": 1}, headers=b), 403, "model_not_owned")
        problem(client.post(f"/v1/models/{name}/rollback", headers=b), 403, "model_not_owned")
        assert model_state(services_settings, name) == before
    # Not even A's own non-admin keys may change the shared model.
    problem(client.post("/v1/models/chest-xray/rollback", headers=keys["a"]["headers"]), 403, "model_not_owned")
    # A version id of A's model, promoted under a name B may change, is not found (its name is not told).
    with database_for(services_settings).session() as session:
        a_version_id = session.scalar(select(ModelVersion.id).where(ModelVersion.name == "a-model"))
    body = problem(
        client.post("/v1/models/b-own-name/promote", json={"model_version_id": a_version_id}, headers=b),
        404,
        "model_not_found",
    )
    assert "a-model" not in body["detail"]


def test_another_organisation_cannot_train_into_a_model(client, keys, a_model, b_dataset, services_settings) -> None:
    b = keys["b"]["headers"]
    with database_for(services_settings).session() as session:
        runs_before = session.scalar(select(func.count()).select_from(TrainingRun))
    for name in ("a-model", "chest-xray"):
        for promotion in ("always", "if_better", "manual"):
            response = start_run(client, b, dataset=b_dataset["id"], model_name=name, promotion=promotion)
            problem(response, 403, "model_not_owned")
    # Nor fine-tune from A's model: it does not exist for B.
    problem(start_run(client, b, dataset=b_dataset["id"], base_model="a-model@1"), 404, "model_not_found")
    with database_for(services_settings).session() as session:
        assert session.scalar(select(func.count()).select_from(TrainingRun)) == runs_before


def test_the_trainer_checks_ownership_again(client, keys, a_model, b_dataset, services_settings) -> None:
    """A run queued for a free name that another organisation registers first fails before it trains."""
    b = keys["b"]["headers"]
    queued = start_run(client, b, dataset=b_dataset["id"], model_name="contested", promotion="always")
    assert queued.status_code == 202, queued.text
    with database_for(services_settings).session() as session:
        session.add(RegisteredModel(name="contested", owner="hospital-a"))  # A registered it meanwhile
    assert execute_run(services_settings, queued.json()["id"]) is None
    run = client.get(f"/v1/training-runs/{queued.json()['id']}", headers=b).json()
    assert run["status"] == "failed" and run["error"]["code"] == "model_not_owned" and run["model"] is None
    assert model_state(services_settings, "contested") == ([], 0)


def test_another_organisations_model_is_invisible_and_unusable(
    client, keys, a_model, services_settings, chest_images
) -> None:
    a, b = keys["a"]["headers"], keys["b"]["headers"]
    assert "a-model" not in [m["name"] for m in client.get("/v1/models", headers=b).json()]
    for path in ("versions/1", "versions/1/files/roc_curve.png", "activations"):
        problem(client.get(f"/v1/models/a-model/{path}", headers=b), 404, "model_not_found")
    image = chest_images["NORMAL"][30]
    files = {"file": (image.name, image.read_bytes(), "image/jpeg")}
    problem(client.post("/v1/jobs", files=files, data={"model": "a-model"}, headers=b), 404, "model_not_found")
    batch = [("files", (image.name, image.read_bytes(), "image/jpeg"))]
    problem(client.post("/v1/batches", files=batch, data={"model": "a-model@1"}, headers=b), 404, "model_not_found")
    assert client.post("/v1/jobs", files=files, data={"model": "a-model"}, headers=a).status_code == 202
    assert client.post("/v1/jobs", files=files, data={"model": "chest-xray"}, headers=b).status_code == 202

    # Singles of both organisations gathered into one creation (as the gateway's admission does):
    # A's is made, B's is refused, whichever comes first.
    upload = Upload(image.name, image.read_bytes(), "image/jpeg")
    with database_for(services_settings).session() as session:
        made = create_jobs(
            session,
            make_object_store(services_settings),
            make_celery(services_settings),
            [JobRequest([upload], "a-model", organisation=org) for org in ("hospital-a", "hospital-b", "hospital-a")],
            chunk_size=services_settings.predict_chunk_size,
        )
    assert [len(m.jobs) for m in made] == [1, 0, 1]
    assert made[1].error is not None and made[1].error.code == "model_not_found"


@pytest.fixture(scope="module")
def relabelled_run(client, keys, a_model, chest_images, services_settings) -> dict:
    """A's second scientist trains into A's model, if_better, on a dataset whose labels are swapped and that
    brings its own test split: on that split, a model that learnt the swap looks better."""
    a2 = keys["a2"]["headers"]
    relabelled = chest_zip(chest_images, slice(24, 36), slice(36, 40), swap_labels=True)
    dataset = upload_dataset(client, a2, relabelled, "a-chest-relabelled")
    response = start_run(client, a2, dataset=dataset["id"], model_name="a-model", promotion="if_better")
    assert response.status_code == 202, response.text  # A's own organisation may train into A's model
    execute_run(services_settings, response.json()["id"])
    run = client.get(f"/v1/training-runs/{response.json()['id']}", headers=a2).json()
    assert run["status"] == "succeeded" and run["model"] == {"name": "a-model", "version": 2}, run
    return run


def test_if_better_is_judged_on_the_owners_held_out_set(a_model, relabelled_run) -> None:
    assert relabelled_run["evaluation"]["n"] == 8  # the version's own report: on the submitter's split
    decision = relabelled_run["promotion_decision"]
    assert decision["evaluated_on"] == {
        "dataset_id": a_model["dataset"]["id"],
        "split": "test",
        "n": 16,
        "model_held_out_set": True,
    }
    # The active version's figure is its own, on the very images its own run evaluated it on.
    assert decision["active_version"] == 1 and decision["metric"] == "roc_auc"
    assert decision["active"] == pytest.approx(a_model["run"]["evaluation"]["roc_auc"], abs=1e-6)
    assert decision["promote"] == (decision["candidate"] > decision["active"])
    assert "same 16 images" in decision["reason"]


def test_activations_record_the_key_that_made_them(client, keys, a_model, relabelled_run) -> None:
    a = keys["a"]["headers"]
    first = client.get("/v1/models/a-model/activations", headers=a).json()[-1]
    assert first["reason"] == "policy:if_none_active" and first["actor"] == f"training-run:{a_model['run']['id']}"
    assert first["actor_key_id"] == keys["a"]["id"] and first["actor_organisation"] == "hospital-a"

    assert client.post("/v1/models/a-model/promote", json={"version": 2}, headers=a).status_code == 200
    assert client.post("/v1/models/a-model/promote", json={"version": 1}, headers=a).status_code == 200
    assert client.post("/v1/models/a-model/rollback", headers=a).status_code == 200
    latest = client.get("/v1/models/a-model/activations", headers=a).json()[:2]
    assert [(e["reason"], e["version"]) for e in latest] == [("rollback", 2), ("promote", 1)]
    assert {(e["actor_key_id"], e["actor_organisation"], e["actor"]) for e in latest} == {
        (keys["a"]["id"], "hospital-a", "hospital-a")
    }


def test_a_shared_model_shows_other_organisations_no_provenance(
    client, keys, chest_images, services_model, services_settings
) -> None:
    """An admin of A trains the shared model on A's data; B may use it and read what it needs to choose
    it (architecture, classes, metrics, preprocessing), and nothing of A: no dataset, host, run or actor."""
    a_admin, b = keys["a-admin"]["headers"], keys["b"]["headers"]
    name = services_model["name"]
    dataset = upload_dataset(client, a_admin, chest_zip(chest_images, slice(0, 12), slice(12, 16)), "a-secret-dataset")
    response = start_run(client, a_admin, dataset=dataset["id"], model_name=name, promotion="always")
    assert response.status_code == 202, response.text
    execute_run(services_settings, response.json()["id"])
    try:
        version = client.get(f"/v1/training-runs/{response.json()['id']}", headers=a_admin).json()["model"]["version"]
        full = client.get(f"/v1/models/{name}/versions/{version}", headers=a_admin).json()
        assert full["card"]["data"]["dataset"]["name"] == "a-secret-dataset" and full["card"]["training"]["host"]
        secrets = ("a-secret-dataset", dataset["id"], full["training_run_id"], platform.node(), "hospital-a")

        seen = client.get(f"/v1/models/{name}/versions/{version}", headers=b)
        assert seen.status_code == 200
        card = seen.json()
        for key in ("architecture", "classes", "metrics", "preprocessing", "plots"):
            assert card[key] == full[key]
        assert card["dataset_id"] is None and card["training_run_id"] is None
        assert "dataset" not in card["card"]["data"] and "host" not in card["card"]["training"]
        listed = client.get("/v1/models", headers=b)
        assert next(m for m in listed.json() if m["name"] == name)["owner"] is None
        activations = client.get(f"/v1/models/{name}/activations", headers=b)
        assert activations.json()[0]["reason"] == "policy:always"
        for answer in (seen, listed, activations):
            assert not [secret for secret in secrets if secret in answer.text]
        assert all(
            (a["actor"], a["actor_key_id"], a["actor_organisation"]) == (None, None, None) for a in activations.json()
        )
        admins = client.get(f"/v1/models/{name}/activations", headers=a_admin).json()
        assert (admins[0]["actor_key_id"], admins[0]["actor_organisation"]) == (keys["a-admin"]["id"], "hospital-a")
    finally:  # the starter model answers again for the tests that follow
        assert client.post(f"/v1/models/{name}/rollback", headers=a_admin).status_code == 200


def test_only_the_owner_sets_the_held_out_set_and_only_from_its_own_data(
    client, keys, a_model, b_dataset, relabelled_run
) -> None:
    a, b = keys["a"]["headers"], keys["b"]["headers"]

    def set_held_out(name: str, headers: dict[str, str], **body):
        return client.put(f"/v1/models/{name}/evaluation-set", json=body, headers=headers)

    problem(set_held_out("a-model", b, dataset=b_dataset["id"]), 403, "model_not_owned")
    problem(set_held_out("chest-xray", b, dataset=b_dataset["id"]), 403, "model_not_owned")
    # The owner cannot judge its model on another organisation's images either: they do not exist for it.
    problem(set_held_out("a-model", a, dataset=b_dataset["id"]), 404, "dataset_not_found")
    problem(set_held_out("a-model", a, dataset=a_model["dataset"]["id"], split="val"), 422, "invalid_parameter")

    response = set_held_out("a-model", a, dataset=relabelled_run["dataset_id"])
    assert response.status_code == 200, response.text
    assert response.json() == {
        "dataset_id": relabelled_run["dataset_id"],
        "split": "test",
        "classes": ["NORMAL", "PNEUMONIA"],
        "n": 8,
    }
    listed = next(m for m in client.get("/v1/models", headers=a).json() if m["name"] == "a-model")
    assert listed["evaluation_set"]["dataset_id"] == relabelled_run["dataset_id"]
