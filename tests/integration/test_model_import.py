"""Bring your own starting weights: `POST /v1/models/{name}/import`, against the real gateway app on real
Postgres, Redis and the S3 server; the fine-tuning run executed by the trainer's own `execute_run`.

The weights are made here: a torchvision network built with a fixed seed, saved with safetensors.
Hospital A imports them; hospital B holds a `train` key too; the admin imports a shared model.
"""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select

from services.gateway.app import create_app
from services.trainer.runs import execute_run, load_run
from services.trainer.training import load_initial_weights
from shared.core.storage import S3ObjectStore, make_object_store
from shared.db.models import ModelVersion, RegisteredModel
from shared.db.session import database_for
from shared.models.artifacts import load_model
from shared.models.nets import build_model
from tests.conftest import ADMIN_HEADERS
from tests.integration.test_gateway_api import problem
from tests.security.test_model_ownership import chest_zip, create_keys, upload_dataset

pytestmark = pytest.mark.integration

ARCHITECTURE = "mobilenet_v3_small"
CLASSES = "NORMAL,PNEUMONIA"
SEED = 1234  # not the runs' seed 0: a run that ignored the imported weights would start elsewhere


def local_weights(architecture: str = ARCHITECTURE, classes: int = 2, seed: int = SEED) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(architecture, classes).state_dict()


def weights_file(architecture: str = ARCHITECTURE, classes: int = 2) -> bytes:
    return save_safetensors(local_weights(architecture, classes), metadata={"trained_at": "site-b"})


def pickled_weights() -> bytes:
    buffer = io.BytesIO()
    torch.save(local_weights(), buffer)
    return buffer.getvalue()


def send(client, headers, name: str, data: bytes, *, filename: str = "site-b.safetensors", **form: str):
    fields = {"architecture": ARCHITECTURE, "classes": CLASSES, "sha256": hashlib.sha256(data).hexdigest()}
    files = {"file": (filename, data, "application/octet-stream")}
    return client.post(f"/v1/models/{name}/import", files=files, data={**fields, **form}, headers=headers)


@pytest.fixture(scope="module")
def client(services_settings):
    with TestClient(create_app(services_settings), headers=ADMIN_HEADERS) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def keys(client) -> dict[str, dict[str, str]]:
    return create_keys(
        client,
        [
            ("a", "import-hospital-a", ["train"]),
            ("a-submit", "import-hospital-a", ["submit"]),
            ("b", "import-hospital-b", ["train"]),
        ],
    )


def stored_under(settings, prefix: str) -> list[str]:
    store = S3ObjectStore(settings)
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def traces(settings, name: str) -> tuple[int, bool, list[str]]:
    """What exists of `name`: its versions, whether the model row does, and its objects in storage."""
    with database_for(settings).session() as session:
        versions = session.scalar(select(func.count()).where(ModelVersion.name == name)) or 0
        exists = session.get(RegisteredModel, name) is not None
    return versions, exists, stored_under(settings, f"models/{name}/")


@pytest.fixture(scope="module")
def a_import(client, keys) -> dict:
    """Hospital A's weights, imported as the first version of a new name."""
    response = send(client, keys["a"]["headers"], "a-imported", weights_file())
    assert response.status_code == 201, response.text
    return {"response": response, "version": response.json()}


def test_imported_weights_become_an_inactive_version_with_their_provenance(
    client, keys, a_import, services_settings
) -> None:
    response, version = a_import["response"], a_import["version"]
    assert response.headers["location"] == "/v1/models/a-imported/versions/1"
    assert (version["name"], version["version"], version["architecture"]) == ("a-imported", 1, ARCHITECTURE)
    assert version["classes"] == ["NORMAL", "PNEUMONIA"] and version["is_active"] is False
    assert version["preprocessing"]["size"] == 176 and version["preprocessing"]["color"] == "grayscale"
    card = version["card"]
    assert card["source"] == "import"
    assert card["import"] == {
        "uploaded_by": {"key_id": keys["a"]["id"], "organisation": "import-hospital-a"},
        "original_filename": "site-b.safetensors",
        "sha256": hashlib.sha256(weights_file()).hexdigest(),
        "size_bytes": len(weights_file()),
        "dtypes": ["F32", "I64"],
        "metadata": {"trained_at": "site-b"},
    }
    listed = {m["name"]: m for m in client.get("/v1/models", headers=keys["a"]["headers"]).json()}
    assert listed["a-imported"]["owner"] == "import-hospital-a" and listed["a-imported"]["active_version"] is None

    # What is stored serves exactly the weights that were sent.
    with database_for(services_settings).session() as session:
        row = session.scalars(select(ModelVersion).where(ModelVersion.name == "a-imported")).one()
        loaded = load_model(row, make_object_store(services_settings), torch.device("cpu"))
    sent = local_weights()
    assert all(torch.equal(loaded.module.state_dict()[k], sent[k]) for k in sent)
    assert loaded.spec.size == 176 and loaded.classes == ["NORMAL", "PNEUMONIA"]


def test_a_second_import_is_the_next_version_and_its_preprocessing_can_be_chosen(client, keys, a_import) -> None:
    response = send(client, keys["a"]["headers"], "a-imported", weights_file(), image_size="96", color="rgb")
    assert response.status_code == 201, response.text
    version = response.json()
    assert version["version"] == 2 and version["is_active"] is False
    assert version["preprocessing"]["size"] == 96 and version["preprocessing"]["color"] == "rgb"
    promoted = client.post("/v1/models/a-imported/versions/2/promote", headers=keys["a"]["headers"])
    assert promoted.status_code == 200 and promoted.json()["is_active"] is True  # activation: the usual endpoint


BAD_INPUT = {
    # case: (form and file changes, status, code)
    "wrong shapes": ({"data": weights_file(classes=3)}, 422, "weights_mismatch"),
    "another architecture's weights": ({"data": weights_file("resnet18")}, 422, "weights_mismatch"),
    "unknown architecture": ({"architecture": "resnet9000"}, 422, "unknown_architecture"),
    "a size the architecture cannot take": (
        {"architecture": "vit_b_16", "image_size": "128"},
        422,
        "invalid_parameter",
    ),
    "a pickle (torch.save)": ({"data": pickled_weights(), "filename": "model.pt"}, 415, "weights_pickled"),
    "sha256 mismatch": ({"sha256": "0" * 64}, 422, "weights_sha256_mismatch"),
    "sha256 not hex": ({"sha256": "not-a-digest"}, 422, "invalid_parameter"),
    "empty file": ({"data": b""}, 400, "empty_file"),
    "garbage": ({"data": b"\x00garbage" * 100}, 422, "weights_unreadable"),
    "no classes": ({"classes": ""}, 422, "invalid_classes"),
    "one class": ({"classes": "NORMAL"}, 422, "invalid_classes"),
    "duplicated classes": ({"classes": "NORMAL,NORMAL"}, 422, "invalid_classes"),
    "too many classes": ({"classes": ",".join(f"c{i}" for i in range(1001))}, 422, "invalid_classes"),
    "a class name no dataset could have": ({"classes": "NORMAL,../etc"}, 422, "invalid_classes"),
    "no architecture": ({"architecture": ""}, 422, "invalid_request"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_refused_with_its_code_and_nothing_is_registered(client, keys, case, services_settings) -> None:
    changes, status, code = BAD_INPUT[case]
    changes = dict(changes)
    data = changes.pop("data", weights_file())
    filename = changes.pop("filename", "site-b.safetensors")
    name = "bad-" + hashlib.sha256(case.encode()).hexdigest()[:10]
    body = problem(send(client, keys["a"]["headers"], name, data, filename=filename, **changes), status, code)
    assert traces(services_settings, name) == (0, False, [])
    if code == "weights_mismatch":  # the detail and the problem name the offending tensors
        named = body["tensors"]["mismatched"] or body["tensors"]["missing"]
        assert named and named[0].split(":")[0] in body["detail"]


def test_a_model_name_that_fails_the_pattern_is_refused(client, keys, services_settings) -> None:
    for name in ("Chest-Xray", "-leading-dash", "x" * 65, "a b"):
        problem(send(client, keys["a"]["headers"], name, weights_file()), 422, "invalid_model_name")
        assert traces(services_settings, name) == (0, False, [])


def test_another_organisation_cannot_import_into_a_model(client, keys, a_import, services_settings) -> None:
    before = traces(services_settings, "a-imported")
    b = keys["b"]["headers"]
    body = problem(send(client, b, "a-imported", weights_file()), 403, "model_not_owned")
    assert "another organisation" in body["detail"]
    assert traces(services_settings, "a-imported") == before
    # A shared model (first imported by an admin): only an admin may add to it.
    assert send(client, ADMIN_HEADERS, "shared-imported", weights_file()).status_code == 201
    for headers in (b, keys["a"]["headers"]):
        problem(send(client, headers, "shared-imported", weights_file()), 403, "model_not_owned")
    assert traces(services_settings, "shared-imported")[0] == 1
    # B sees neither A's imported model nor its provenance.
    problem(client.get("/v1/models/a-imported/versions/1", headers=b), 404, "model_not_found")
    shared_card = client.get("/v1/models/shared-imported/versions/1", headers=b).json()["card"]
    assert "import" not in shared_card and "source" not in shared_card


def test_a_key_without_the_train_role_cannot_import(client, keys, services_settings) -> None:
    problem(send(client, keys["a-submit"]["headers"], "submit-import", weights_file()), 403, "forbidden")
    assert traces(services_settings, "submit-import") == (0, False, [])


def test_weights_over_the_upload_cap_are_refused(services_settings, keys) -> None:
    capped = services_settings.model_copy(update={"max_weights_upload_bytes": 64 * 1024})
    with TestClient(create_app(capped)) as capped_client:
        response = send(capped_client, keys["a"]["headers"], "too-big", weights_file())
    assert response.status_code == 413 and response.json()["code"] in ("request_too_large", "file_too_large")
    assert traces(services_settings, "too-big") == (0, False, [])


def test_the_openapi_document_describes_the_import(client) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/models/{name}/import"]["post"]
    assert operation["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("ModelVersionView")
    assert {"403", "413", "415", "422"} <= set(operation["responses"])
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    fields = client.get("/openapi.json").json()["components"]["schemas"][form]
    assert {"file", "architecture", "classes", "sha256", "image_size", "color"} == set(fields["properties"])


def test_a_run_fine_tunes_from_the_imported_weights(client, keys, a_import, chest_images, services_settings) -> None:
    a = keys["a"]["headers"]
    dataset = upload_dataset(client, a, chest_zip(chest_images, slice(0, 8), slice(8, 12)), "import-chest")
    response = client.post(
        "/v1/training-runs",
        json={
            "dataset": dataset["id"],
            "model_name": "a-imported",
            "base_model": "a-imported@1",
            "epochs": 1,
            "batch_size": 8,
            "max_per_class": 6,
            "learning_rate": 1e-6,  # fine-tuning barely moves the weights: they stay the imported ones
        },
        headers=a,
    )
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]
    assert response.json()["config"]["architecture"] == ARCHITECTURE
    assert response.json()["config"]["image_size"] == 176  # the imported version's

    # The trainer's inputs hold every imported tensor, and the network takes all of them.
    inputs = load_run(services_settings, database_for(services_settings), make_object_store(services_settings), run_id)
    assert inputs.base == {"name": "a-imported", "version": 1} and inputs.base_weights is not None
    assert load_initial_weights(build_model(ARCHITECTURE, 2), inputs.base_weights) == []

    assert execute_run(services_settings, run_id) is not None
    run = client.get(f"/v1/training-runs/{run_id}", headers=a).json()
    assert run["status"] == "succeeded" and run["model"]["name"] == "a-imported", run
    number = run["model"]["version"]
    version = client.get(f"/v1/models/a-imported/versions/{number}", headers=a).json()
    assert version["card"]["training"]["base_model"] == {"name": "a-imported", "version": 1}
    assert version["is_active"] is False  # promotion "manual"
    with database_for(services_settings).session() as session:
        query = select(ModelVersion).where(ModelVersion.name == "a-imported", ModelVersion.version == number)
        row = session.scalars(query).one()
        tuned = load_safetensors(make_object_store(services_settings).get(row.weights_key))
    imported, fresh = local_weights(), local_weights(seed=0)
    first = "features.0.0.weight"
    assert (tuned[first] - imported[first]).abs().max() < 1e-3 < (tuned[first] - fresh[first]).abs().max()
