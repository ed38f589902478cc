"""Grad-CAM explanations against the real gateway, Postgres, Redis and S3, with the worker's predictor run
on the published ids: asked at submission or later, computed once, kept with the job and its version;
every way of not having one answered with its own code, and never at the expense of the answer."""

from __future__ import annotations

import io
import json
import uuid

import pytest
import torch
from PIL import Image
from prometheus_client import REGISTRY
from safetensors.torch import load as load_safetensors
from sqlalchemy import select, update

from services.worker.explaining import Outcome
from services.worker.inference import ModelCache, Predictor
from shared.core.storage import make_object_store
from shared.db.models import Job, ModelVersion
from shared.db.session import database_for
from shared.imaging.preprocess import PreprocessSpec
from shared.models.artifacts import register_version
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def predictor(services_settings, services_model) -> Predictor:
    """A worker process's predictor; coalescing off, so it takes exactly the jobs it is given."""
    settings = services_settings.model_copy(update={"coalesce_singles": False})
    store = make_object_store(settings)
    return Predictor(settings, database_for(settings), store, ModelCache(store, torch.device("cpu")))


@pytest.fixture(scope="module")
def keys(client) -> dict[str, dict[str, str]]:
    """Submit keys of two organisations, made by the bootstrap admin key."""
    made = {}
    for organisation in ("north", "south"):
        response = client.post(
            "/v1/api-keys", json={"name": f"{organisation}-pacs", "organisation": organisation, "roles": ["submit"]}
        )
        assert response.status_code == 201, response.text
        made[organisation] = {"Authorization": f"Bearer {response.json()['key']}"}
    return made


def submit(client, image, *, explain: bool | None = None, model: str | None = None, headers=None) -> str:
    data = {} if explain is None else {"explain": "true" if explain else "false"}
    if model:
        data["model"] = model
    response = client.post(
        "/v1/jobs", files={"file": (image.name, image.read_bytes(), "image/jpeg")}, data=data, headers=headers
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code
    return response.json()


def explanation_messages(services_settings, job_id: str) -> int:
    """`explain` messages for the job waiting on the `predict` queue (no worker consumes them here)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        raw = client.lrange(f"{services_settings.broker_key_prefix}predict", 0, -1)
    finally:
        client.close()
    headers = [json.loads(message)["headers"] for message in raw]
    return sum(h.get("task") == "xrayq.explain" and job_id in str(h.get("argsrepr")) for h in headers)


def test_a_job_that_asked_gets_its_heatmap_as_png_and_as_json_with_its_version(
    client, predictor, services_model, chest_images
) -> None:
    job_id = submit(client, chest_images["PNEUMONIA"][3], explain=True)
    assert client.get(f"/v1/jobs/{job_id}").json()["explanation"]["status"] == "pending"
    pending = client.get(f"/v1/jobs/{job_id}/explanation")
    assert pending.status_code == 202 and pending.json()["status"] == "pending" and pending.headers["Retry-After"]
    assert predictor.run([job_id]) == {"claimed": 1}

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["explanation"] == {
        "job_id": job_id, "status": "succeeded", "location": f"/v1/jobs/{job_id}/explanation", "error": None,
    }  # fmt: skip
    answered = job["result"]["model"]

    png = client.get(f"/v1/jobs/{job_id}/explanation")  # the default: the overlay
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["X-Xrayq-Model"] == f"{answered['name']}@{answered['version']}"
    image = Image.open(io.BytesIO(png.content))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)  # the model's input size
    assert image.text["xrayq:model"] == f"{answered['name']}@{answered['version']}"
    assert image.text["xrayq:label"] == job["result"]["label"] and image.text["target_layer"] == "features"

    raw = client.get(f"/v1/jobs/{job_id}/explanation", params={"format": "json"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    body = raw.json()
    assert body["model"] == answered and body["label"] == job["result"]["label"]
    assert body["method"] == "grad-cam" and body["target_layer"] == "features"  # mobilenet_v3_small's card
    assert (body["width"], body["height"]) == (2, 2)  # the last feature map of a 64 px MobileNetV3
    assert len(body["map"]) == body["height"] and all(len(row) == body["width"] for row in body["map"])
    assert all(0 <= value <= 1 for row in body["map"] for value in row)
    assert body["overlay"] == {"location": f"/v1/jobs/{job_id}/explanation?format=png", "width": 64, "height": 64}
    negotiated = client.get(f"/v1/jobs/{job_id}/explanation", headers={"Accept": "application/json"})
    assert negotiated.json() == body
    assert client.get(body["overlay"]["location"]).content == png.content


def test_a_batch_asks_for_every_image_and_one_pass_explains_them(client, predictor, chest_images) -> None:
    paths = chest_images["NORMAL"][3:5] + chest_images["PNEUMONIA"][4:6]
    response = client.post(
        "/v1/batches",
        files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths],
        data={"explain": "true"},
    )
    assert response.status_code == 202, response.text
    ids = response.json()["job_ids"]
    assert predictor.run(ids) == {"claimed": 4}
    batch = client.get(response.json()["location"]).json()
    assert [job["explanation"]["status"] for job in batch["jobs"]] == ["succeeded"] * 4
    for job_id in ids:
        assert client.get(f"/v1/jobs/{job_id}/explanation").headers["content-type"] == "image/png"


def test_asking_is_part_of_what_an_idempotency_key_stands_for(client, chest_images) -> None:
    image = chest_images["PNEUMONIA"][14]
    key = {"Idempotency-Key": f"explain-{uuid.uuid4()}"}
    first = client.post(
        "/v1/jobs", files={"file": (image.name, image.read_bytes())}, data={"explain": "true"}, headers=key
    )
    assert first.status_code == 202, first.text
    again = client.post(
        "/v1/jobs", files={"file": (image.name, image.read_bytes())}, data={"explain": "true"}, headers=key
    )
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    problem(
        client.post("/v1/jobs", files={"file": (image.name, image.read_bytes())}, headers=key),
        409,
        "idempotency_key_conflict",
    )
    assert client.get(f"/v1/jobs/{first.json()['id']}").json()["explanation"]["status"] == "pending"


def test_a_study_instance_can_ask_too(client, predictor, data_dir) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(data_dir / "dicom" / "RG3_UNCR.dcm")
    ds.StudyInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    response = client.post(
        "/v1/studies", files=[("files", ("x.dcm", buffer.getvalue(), "application/dicom"))], data={"explain": "true"}
    )
    assert response.status_code == 202, response.text
    (job_id,) = response.json()["studies"][0]["job_ids"]
    predictor.run([job_id])
    assert client.get(f"/v1/jobs/{job_id}/explanation").status_code == 200


def test_asked_for_later_it_is_queued_for_a_worker_made_once_and_never_again(
    client, predictor, services_settings, chest_images
) -> None:
    job_id = submit(client, chest_images["NORMAL"][7])
    assert predictor.run([job_id]) == {"claimed": 1}
    assert client.get(f"/v1/jobs/{job_id}").json()["explanation"] is None
    problem(client.get(f"/v1/jobs/{job_id}/explanation"), 404, "explanation_not_requested")

    asked = client.post(f"/v1/jobs/{job_id}/explanation")
    assert asked.status_code == 202 and asked.json()["status"] == "pending"
    assert asked.headers["Location"] == f"/v1/jobs/{job_id}/explanation"
    assert explanation_messages(services_settings, job_id) == 1  # the gateway queued it; it ran no model
    assert client.get(f"/v1/jobs/{job_id}/explanation").status_code == 202
    again = client.post(f"/v1/jobs/{job_id}/explanation")  # while pending: the same request, not a second
    assert again.status_code == 202 and explanation_messages(services_settings, job_id) == 1

    assert predictor.explainer.explain_job(job_id) == Outcome.explained  # what the `explain` task runs
    made = client.get(f"/v1/jobs/{job_id}/explanation", params={"format": "json"})
    assert (
        made.status_code == 200 and made.json()["label"] == client.get(f"/v1/jobs/{job_id}").json()["result"]["label"]
    )
    overlay = client.get(f"/v1/jobs/{job_id}/explanation").content

    existing = client.post(f"/v1/jobs/{job_id}/explanation")  # computed once: the one there is
    assert existing.status_code == 200 and existing.json()["status"] == "succeeded"
    assert explanation_messages(services_settings, job_id) == 1
    assert predictor.explainer.explain_job(job_id) == Outcome.nothing  # a redelivered message does nothing
    assert client.get(f"/v1/jobs/{job_id}/explanation", params={"format": "json"}).json() == made.json()
    assert client.get(f"/v1/jobs/{job_id}/explanation").content == overlay


def test_asked_for_while_queued_the_prediction_explains_it_and_no_message_is_sent(
    client, predictor, services_settings, chest_images
) -> None:
    job_id = submit(client, chest_images["PNEUMONIA"][8])
    assert client.post(f"/v1/jobs/{job_id}/explanation").status_code == 202
    assert explanation_messages(services_settings, job_id) == 0  # the claim will read it
    assert predictor.explainer.explain_job(job_id) == Outcome.unanswered  # a message now would wait and retry
    predictor.run([job_id])
    assert client.get(f"/v1/jobs/{job_id}/explanation").status_code == 200


def test_another_organisations_job_is_not_found(client, keys, predictor, chest_images) -> None:
    job_id = submit(client, chest_images["NORMAL"][9], explain=True, headers=keys["north"])
    predictor.run([job_id])
    assert client.get(f"/v1/jobs/{job_id}/explanation", headers=keys["north"]).status_code == 200
    for method in ("GET", "POST"):
        problem(client.request(method, f"/v1/jobs/{job_id}/explanation", headers=keys["south"]), 404, "job_not_found")


def test_a_failed_or_cancelled_job_has_no_explanation(client, predictor, services_settings, chest_images) -> None:
    failed = submit(client, chest_images["NORMAL"][10], explain=True)
    with database_for(services_settings).session() as session:
        key = session.get(Job, failed).input_key
    make_object_store(services_settings).put(key, b"\xff\xd8\xff\xe0 not a whole jpeg")  # broken after intake
    predictor.run([failed])
    job = client.get(f"/v1/jobs/{failed}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "input_corrupted"
    assert job["explanation"]["status"] == "failed" and job["explanation"]["error"]["code"] == "job_not_succeeded"

    cancelled = submit(client, chest_images["NORMAL"][11])
    assert client.delete(f"/v1/jobs/{cancelled}").json()["status"] == "cancelled"
    for job_id in (failed, cancelled):
        problem(client.get(f"/v1/jobs/{job_id}/explanation"), 409, "job_not_succeeded")
        problem(client.post(f"/v1/jobs/{job_id}/explanation"), 409, "job_not_succeeded")


def copy_with_explain(settings, services_model, explain: dict | None) -> str:
    """The session's tiny model registered again under a name of its own, active, with this card
    `explain` section (None: a card from before the field); its name."""
    store = make_object_store(settings)
    name = f"chest-explain-{uuid.uuid4().hex[:8]}"
    with database_for(settings).session() as session:
        row = session.scalars(
            select(ModelVersion).where(
                ModelVersion.name == services_model["name"], ModelVersion.version == services_model["version"]
            )
        ).one()
        copy = register_version(
            session, store, name=name, scope=None, architecture=row.architecture, classes=list(row.classes),
            preprocessing=PreprocessSpec.from_dict(row.card["preprocessing"]),
            state_dict=load_safetensors(store.get(row.weights_key)), metrics={}, data={}, training={},
            activate="always",
        )  # fmt: skip
        assert copy.card["explain"] == {"method": "grad-cam", "target_layer": "features", "layout": "nchw"}
        card = {key: value for key, value in copy.card.items() if key != "explain"}
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.id == copy.id)
            .values(card={**card, "explain": explain} if explain else card)
        )
    return name


@pytest.mark.parametrize(
    ("explain", "says"),
    [
        ({"method": "grad-cam", "target_layer": "no.such.layer", "layout": "nchw"}, "is not a layer of this model"),
        ({"method": "grad-cam", "target_layer": "classifier.3", "layout": "nchw"}, "gives a 2-D output"),
    ],
)
def test_a_card_without_a_usable_layer_fails_the_explanation_and_never_the_answer(
    client, predictor, services_settings, services_model, chest_images, explain: dict, says: str
) -> None:
    name = copy_with_explain(services_settings, services_model, explain)
    job_id = submit(client, chest_images["PNEUMONIA"][12], explain=True, model=name)
    predictor.run([job_id])
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["result"]["label"] in ("NORMAL", "PNEUMONIA")
    assert job["explanation"]["status"] == "failed" and job["explanation"]["error"]["code"] == "explanation_unavailable"
    body = problem(client.get(f"/v1/jobs/{job_id}/explanation"), 422, "explanation_unavailable")
    assert says in body["detail"]
    problem(client.post(f"/v1/jobs/{job_id}/explanation"), 422, "explanation_unavailable")  # final: not retried


def test_a_version_registered_before_cards_named_a_layer_is_explained_at_its_architectures_default(
    client, predictor, services_settings, services_model, chest_images
) -> None:
    name = copy_with_explain(services_settings, services_model, None)
    job_id = submit(client, chest_images["NORMAL"][12], explain=True, model=name)
    predictor.run([job_id])
    body = client.get(f"/v1/jobs/{job_id}/explanation", params={"format": "json"}).json()
    assert body["target_layer"] == "features" and body["model"]["name"] == name


def test_answers_nobody_asked_to_explain_cost_no_explanation_work(
    client, predictor, services_settings, services_model, chest_images
) -> None:
    def explanation_passes() -> float:
        return REGISTRY.get_sample_value("xrayq_explanation_seconds_count", {"model": services_model["name"]}) or 0

    before = explanation_passes()
    ids = [submit(client, path) for path in chest_images["NORMAL"][13:16]]
    assert predictor.run(ids) == {"claimed": 3}
    assert explanation_passes() == before  # no Grad-CAM pass, so no hook and no gradient
    model = predictor.cache.get(_version_row(services_settings, services_model))
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in model.module.modules())
    assert all(parameter.grad is None for parameter in model.module.parameters())


def _version_row(settings, services_model) -> ModelVersion:
    with database_for(settings).session() as session:
        row = session.scalars(
            select(ModelVersion).where(
                ModelVersion.name == services_model["name"], ModelVersion.version == services_model["version"]
            )
        ).one()
        session.expunge(row)
    return row
