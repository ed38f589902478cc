"""Datasets, training runs and the registry through the real gateway, Postgres and S3.

Runs are executed in-process by the trainer's own `execute_run` (the e2e tests start a real trainer).
"""

from __future__ import annotations

import io
import threading
import time
import zipfile
from datetime import timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import func, select, update

from services.gateway.app import create_app
from services.trainer.runs import execute_run
from shared.core.storage import make_object_store
from shared.db.models import Dataset, ModelVersion, TrainingRun, utcnow
from shared.db.session import database_for
from shared.training.datasets import blob_key
from shared.training.reconciler import reconcile_runs
from shared.training.runs import claim_run
from tests.conftest import ADMIN_HEADERS, png_bytes
from tests.integration.test_gateway_api import problem, zip_bomb

TINY_RUN = {"architecture": "mobilenet_v3_small", "image_size": 64, "epochs": 1, "batch_size": 16}


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def chest_zip(chest_images, per_class: int = 24, prefix: str = "", test: int = 0) -> bytes:
    """Real chest X-rays as CLASS/ folders, or train/CLASS/ and test/CLASS/ when `test` images are asked for."""
    train_dir = "train/" if test else ""
    files = {}
    for label, paths in chest_images.items():
        for path in paths[:per_class]:
            files[f"{prefix}{train_dir}{label}/{path.name}"] = path.read_bytes()
        for path in paths[per_class : per_class + test]:
            files[f"{prefix}test/{label}/{path.name}"] = path.read_bytes()
    return make_zip(files)


def upload(client, data: bytes, **form):
    return client.post("/v1/datasets", files={"file": ("data.zip", data, "application/zip")}, data=form)


def dataset_count(settings) -> int:
    with database_for(settings).session() as session:
        return session.scalar(select(func.count()).select_from(Dataset)) or 0


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met before the deadline")


@pytest.fixture(scope="module")
def chest_dataset(client, chest_images) -> dict:
    response = upload(client, chest_zip(chest_images, per_class=24, prefix="chest_xray/", test=8), name="chest-small")
    assert response.status_code == 201, response.text
    return response.json()


def test_zip_of_split_class_folders_becomes_an_immutable_dataset(client, chest_dataset, services_settings) -> None:
    body = chest_dataset
    assert body["classes"] == ["NORMAL", "PNEUMONIA"]
    assert body["counts"] == {"train": {"NORMAL": 24, "PNEUMONIA": 24}, "test": {"NORMAL": 8, "PNEUMONIA": 8}}
    assert body["files"] == 64 and body["version"] == 1 and body["details"]["layout"] == "split_folders"
    assert client.get(f"/v1/datasets/{body['id']}").json() == body
    assert client.get("/v1/datasets/chest-small").json()["id"] == body["id"]
    assert body["id"] in [d["id"] for d in client.get("/v1/datasets").json()]

    store = make_object_store(services_settings)
    with database_for(services_settings).session() as session:
        row = session.get(Dataset, body["id"])
        from shared.training.datasets import load_manifest

        manifest = load_manifest(store, row)
    entry = manifest["files"][0]
    assert {"path", "split", "label", "sha256"} <= set(entry)
    import hashlib

    assert hashlib.sha256(store.get(blob_key(entry["sha256"]))).hexdigest() == entry["sha256"]


def test_a_dataset_can_extend_an_earlier_one(client, chest_dataset, chest_images) -> None:
    extra = make_zip({f"NORMAL/{p.name}": p.read_bytes() for p in chest_images["NORMAL"][32:36]})
    response = upload(client, extra, extends=chest_dataset["id"])
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "chest-small" and body["version"] == 2 and body["parent_id"] == chest_dataset["id"]
    assert body["counts"]["train"] == {"NORMAL": 28, "PNEUMONIA": 24}
    assert body["files"] == chest_dataset["files"] + 4
    # The original stays as it was.
    assert client.get(f"/v1/datasets/{chest_dataset['id']}").json()["files"] == chest_dataset["files"]


def test_npz_dataset_with_class_names(client) -> None:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        train_images=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
        train_labels=np.array([[i % 2] for i in range(20)]),
        test_images=rng.integers(0, 255, (6, 28, 28), dtype=np.uint8),
        test_labels=np.array([[i % 2] for i in range(6)]),
    )
    response = upload(client, buffer.getvalue(), name="mnist-like", classes="normal,pneumonia")
    assert response.status_code == 201, response.text
    assert response.json()["counts"] == {
        "train": {"normal": 10, "pneumonia": 10},
        "test": {"normal": 3, "pneumonia": 3},
    }


def test_bad_dataset_uploads_get_their_own_codes_and_store_nothing(client, chest_images, services_settings) -> None:
    jpeg = chest_images["NORMAL"][0].read_bytes()
    before = dataset_count(services_settings)
    cases = [
        (make_zip({"NORMAL/a.jpeg": jpeg, "NORMAL/b.jpeg": jpeg}), 422, "dataset_too_few_classes"),
        (make_zip({"README.txt": b"hello"}), 422, "dataset_empty"),
        (make_zip({"train/NORMAL/a.jpeg": jpeg, "PNEUMONIA/b.jpeg": jpeg}), 422, "dataset_mixed_layout"),
        (make_zip({"a.jpeg": jpeg, "NORMAL/b.jpeg": jpeg}), 422, "dataset_invalid_layout"),
        (
            make_zip(
                {"train/A/a.jpeg": jpeg, "train/B/b.png": png_bytes(np.zeros((40, 40), np.uint8)), "val/C/c.jpeg": jpeg}
            ),
            422,
            "dataset_split_mismatch",
        ),
        (make_zip({"A/a.jpeg": jpeg, "../B/b.jpeg": jpeg}), 422, "archive_unsafe_path"),
        (b"not an archive at all", 415, "unsupported_media_type"),
        (make_zip({"A/a.jpeg": jpeg, "B/b.jpeg": jpeg})[:-30], 422, "archive_unreadable"),
    ]
    for data, status, code in cases:
        problem(upload(client, data, name="bad"), status, code)

    truncated = make_zip({"A/a.jpeg": jpeg, "B/b.jpeg": jpeg[: len(jpeg) // 2], "B/c.jpeg": jpeg})
    body = problem(upload(client, truncated, name="bad"), 422, "dataset_unreadable_files")
    assert [f["path"] for f in body["files"]] == ["B/b.jpeg"]
    assert dataset_count(services_settings) == before
    accepted = upload(client, truncated, name="skipping", skip_unreadable="true")
    assert accepted.status_code == 201
    assert accepted.json()["details"]["skipped_unreadable"][0]["path"] == "B/b.jpeg"
    problem(upload(client, make_zip({"A/a.jpeg": jpeg}), name="Bad Name"), 422, "invalid_parameter")
    problem(upload(client, make_zip({"A/a.jpeg": jpeg}), extends="no-such-dataset"), 404, "dataset_not_found")


def test_dataset_archive_limits(services_settings, services_model, chest_images) -> None:
    settings = services_settings.model_copy(update={"max_dataset_expanded_bytes": 4 << 20, "max_dataset_files": 3})
    with TestClient(create_app(settings), headers=ADMIN_HEADERS) as small:
        problem(upload(small, zip_bomb(8 << 20), name="bomb"), 413, "archive_too_large")
        jpeg = chest_images["NORMAL"][0].read_bytes()
        many = make_zip({f"A/{i}.jpeg": jpeg for i in range(4)})
        problem(upload(small, many, name="many"), 413, "too_many_files")


def test_run_requests_are_validated(client, chest_dataset) -> None:
    def start(**fields):
        return client.post("/v1/training-runs", json={"dataset": chest_dataset["id"], **fields})

    problem(client.post("/v1/training-runs", json={"dataset": "nope"}), 404, "dataset_not_found")
    problem(start(epochs=0), 422, "invalid_request")
    problem(start(epochs=100_000), 422, "invalid_parameter")
    problem(start(architecture="resnet9000"), 422, "unknown_architecture")
    problem(start(architecture="vit_b_16", image_size=128), 422, "invalid_parameter")
    problem(start(base_model="chest-xray@999"), 404, "model_not_found")
    problem(start(base_model="chest-xray@1", architecture="resnet18"), 422, "base_model_mismatch")
    problem(start(promotion="sometimes"), 422, "invalid_request")
    problem(start(class_balance="oversample"), 422, "invalid_request")
    problem(start(normalization="histeq"), 422, "invalid_request")


def test_class_weighting_of_older_clients_becomes_class_balance(client, chest_dataset) -> None:
    def queued_config(**fields):
        response = client.post("/v1/training-runs", json={"dataset": chest_dataset["id"], **fields})
        assert response.status_code == 202, response.text
        client.post(f"/v1/training-runs/{response.json()['id']}/cancel")
        return response.json()["config"]

    assert queued_config()["class_balance"] == "sampler"
    assert queued_config()["normalization"] == "clahe_standardize"
    assert queued_config(class_weighting=False)["class_balance"] == "none"
    assert queued_config(class_weighting=True)["class_balance"] == "loss_weights"
    assert queued_config(class_weighting=True, class_balance="sampler")["class_balance"] == "sampler"


def test_a_run_trains_evaluates_registers_and_promotes_if_better(client, chest_dataset, services_settings) -> None:
    response = client.post(
        "/v1/training-runs",
        json={"dataset": chest_dataset["id"], "model_name": "chest-xray", "promotion": "manual", **TINY_RUN},
    )
    assert response.status_code == 202, response.text
    run = response.json()
    assert run["status"] == "queued" and response.headers["location"] == f"/v1/training-runs/{run['id']}"

    outcome = execute_run(services_settings, run["id"])
    assert outcome is not None
    assert execute_run(services_settings, run["id"]) is None  # a redelivered message does nothing
    # The trainer's gauges (services/trainer/metrics.py, served by `xrayq trainer`) show where it got to.
    assert REGISTRY.get_sample_value("xrayq_training_run_epoch") == 1
    assert REGISTRY.get_sample_value("xrayq_training_run_progress_ratio") == 1.0
    assert REGISTRY.get_sample_value("xrayq_training_run_phase", {"phase": "registering"}) == 1
    assert REGISTRY.get_sample_value("xrayq_training_run_phase", {"phase": "training"}) == 0

    done = client.get(f"/v1/training-runs/{run['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["progress"]["phase"] == "done" and done["progress"]["percent"] == 100.0
    assert [h["epoch"] for h in done["history"]] == [1]
    assert {"train_loss", "val_loss", "val_accuracy", "val_roc_auc"} <= set(done["history"][0])
    assert done["evaluation"]["split"] == "test" and done["evaluation"]["n"] == 16
    assert done["promotion_decision"]["promote"] is False  # manual
    version = done["model"]["version"]

    card = client.get(f"/v1/models/chest-xray/versions/{version}").json()
    assert card["is_active"] is False and card["training_run_id"] == run["id"]
    assert card["dataset_id"] == chest_dataset["id"]
    report = card["metrics"]["evaluation"]
    for key in ("accuracy", "per_class", "sensitivity", "specificity", "roc_auc", "confusion_matrix", "threshold"):
        assert key in report
    assert 0.0 <= report["calibration"]["ece"] <= 1.0
    assert_calibrated(card, report)
    # The recipe's preprocessing, recorded in the card; the robustness table of the same test images.
    assert card["card"]["preprocessing"]["normalization"] == "clahe_standardize"
    assert card["card"]["training"]["config"]["class_balance"] == "sampler"
    robustness = report["robustness"]
    assert robustness["split"] == "test" and robustness["n"] == 16 and len(robustness["corruptions"]) == 36
    assert {"corruption", "severity", "roc_auc", "accuracy", "sensitivity", "specificity"} <= set(
        robustness["corruptions"][0]
    )
    proxy = robustness["proxy"]
    assert proxy["worst_specificity"] <= proxy["mean_specificity"] and 0.0 <= proxy["mean_roc_auc"] <= 1.0
    assert robustness["gap"]["roc_auc"] == robustness["clean"]["roc_auc"] - proxy["mean_roc_auc"]
    assert done["evaluation"]["shift_proxy"] == proxy
    assert set(card["plots"]) == {"confusion_matrix", "roc_curve", "learning_curves", "reliability", "robustness"}
    for url in card["plots"].values():
        image = client.get(url)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

    # Promote it, then roll back to the version that was active before.
    previous = next(m for m in client.get("/v1/models").json() if m["name"] == "chest-xray")["active_version"]
    promoted = client.post(f"/v1/models/chest-xray/versions/{version}/promote")
    assert promoted.status_code == 200 and promoted.json()["is_active"]
    back = client.post("/v1/models/chest-xray/rollback")
    assert back.status_code == 200 and back.json()["version"] == previous
    problem(client.post("/v1/models/chest-xray/rollback"), 409, "no_previous_version")
    history = client.get("/v1/models/chest-xray/activations").json()
    assert [(a["version"], a["reason"]) for a in history[:2]] == [(previous, "rollback"), (version, "promote")]

    # if_better compares with the active version on the same images, clean and corrupted, each version
    # through its own preprocessing (this candidate's is "fixed", the active version's CLAHE).
    response = client.post(
        "/v1/training-runs",
        json={
            "dataset": chest_dataset["id"],
            "model_name": "chest-xray",
            "promotion": "if_better",
            "normalization": "fixed",
            **TINY_RUN,
        },
    )
    execute_run(services_settings, response.json()["id"])
    candidate_run = client.get(f"/v1/training-runs/{response.json()['id']}").json()
    decision = candidate_run["promotion_decision"]
    assert decision["metric"] == "roc_auc" and decision["active_version"] == previous
    proxies = decision["shift_proxies"]
    assert proxies["compared"] and proxies["candidate"] == candidate_run["evaluation"]["shift_proxy"]
    assert proxies["active"]["corruptions"] == 36 and proxies["tolerances"]["mean_specificity"] == 0.05
    assert decision["promote"] == (decision["candidate"] > decision["active"] and not proxies["worse_on"])
    fixed = client.get(f"/v1/models/chest-xray/versions/{candidate_run['model']['version']}").json()
    assert fixed["card"]["preprocessing"]["normalization"] == "fixed"


def test_a_locally_trained_version_has_a_dataset_a_run_a_report_and_plots(client, services_model) -> None:
    # services_model is trained as the starter model is (train_and_register, no server): the same
    # intake, run and executor as an API run, so its version is documented like one.
    name, version = services_model["name"], services_model["version"]
    card = client.get(f"/v1/models/{name}/versions/{version}").json()
    assert card["is_active"] is True  # the first version of its name: if_none_active activates it
    run = client.get(f"/v1/training-runs/{card['training_run_id']}").json()
    assert run["status"] == "succeeded" and run["model"] == {"name": name, "version": version}
    assert run["promotion"] == "if_none_active" and run["promotion_decision"]["promote"] is True
    assert run["config"]["max_per_class"] == 48 and run["config"]["intended_use"] == {
        "body_parts": ["CHEST"],
        "modalities": ["CR", "DX"],
    }
    dataset = client.get(f"/v1/datasets/{card['dataset_id']}").json()
    assert dataset["counts"] == {"train": {"NORMAL": 48, "PNEUMONIA": 48}}
    assert dataset["details"]["source"] == "zip" and dataset["details"]["layout"] == "class_folders"
    assert run["evaluation"]["split"] == "val" and run["evaluation"]["n"] == card["card"]["data"]["counts"]["val"]
    assert card["evaluation"]["summary"] == run["evaluation"]
    assert services_model["validation"]["accuracy"] == card["metrics"]["validation"]["accuracy"]
    assert set(card["plots"]) == {"confusion_matrix", "roc_curve", "learning_curves", "reliability", "robustness"}
    for url in card["plots"].values():
        image = client.get(url)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert_calibrated(card, card["metrics"]["evaluation"])


def assert_calibrated(card: dict, report: dict) -> None:
    """The card records the temperature and the uncertainty threshold fitted on validation; the
    evaluation report shows calibration before and after, and what the flag catches."""
    calibration = card["card"]["calibration"]
    assert calibration["method"] == "temperature" and calibration["fitted_on"] == "validation"
    assert calibration["n"] == card["card"]["data"]["counts"]["val"]
    assert 0.05 <= calibration["temperature"] <= 20
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9
    assert {"ece_before", "ece_after"} <= set(calibration)
    assert card["calibration"] == {"calibrated": True, **calibration}
    uncertainty = card["card"]["uncertainty"]
    assert uncertainty["method"] == "mc_dropout" and uncertainty["chosen_on"] == "validation"  # MobileNet's head
    assert 0 <= uncertainty["threshold"] <= 1 and card["uncertainty"]["flags"] is True
    assert report["calibration"]["temperature"] == calibration["temperature"]
    assert 0 <= report["calibration"]["before"]["ece"] <= 1 and report["calibration"]["calibrated"] is True
    assert report["uncertainty"]["threshold"] == uncertainty["threshold"]
    assert report["uncertainty"]["n"] == report["n"]


def test_promotion_errors(client, chest_dataset, services_settings) -> None:
    problem(client.post("/v1/models/chest-xray/versions/999/promote"), 404, "model_not_found")
    problem(client.post("/v1/models/no-such-model/rollback"), 404, "model_not_found")
    with database_for(services_settings).session() as session:
        other = session.scalars(select(ModelVersion).where(ModelVersion.name == "chest-xray")).first()
        assert other is not None
        other_id = other.id
    body = problem(
        client.post("/v1/models/malaria/promote", json={"model_version_id": other_id}), 422, "model_name_mismatch"
    )
    assert "chest-xray" in body["detail"]
    problem(client.get("/v1/models/chest-xray/versions/1/files/nothing.png"), 404, "not_found")


def test_cancelling_a_queued_and_a_running_run(client, chest_dataset, services_settings) -> None:
    queued = client.post("/v1/training-runs", json={"dataset": chest_dataset["id"], **TINY_RUN}).json()
    cancelled = client.post(f"/v1/training-runs/{queued['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert execute_run(services_settings, queued["id"]) is None
    problem(client.post(f"/v1/training-runs/{queued['id']}/cancel"), 409, "run_not_cancellable")

    settings = services_settings.model_copy(update={"run_heartbeat_s": 0.0})
    running = client.post("/v1/training-runs", json={"dataset": chest_dataset["id"], **TINY_RUN, "epochs": 50}).json()
    worker = threading.Thread(target=execute_run, args=(settings, running["id"]))
    worker.start()
    wait_for(lambda: client.get(f"/v1/training-runs/{running['id']}").json()["progress"].get("phase") == "training")
    assert client.post(f"/v1/training-runs/{running['id']}/cancel").json()["cancel_requested"] is True
    worker.join(timeout=120)
    final = client.get(f"/v1/training-runs/{running['id']}").json()
    assert final["status"] == "cancelled" and final["model"] is None


def test_a_run_whose_trainer_died_is_queued_again_by_the_reconciler(client, chest_dataset, services_settings) -> None:
    run = client.post("/v1/training-runs", json={"dataset": chest_dataset["id"], **TINY_RUN}).json()
    database = database_for(services_settings)
    with database.session() as session:
        assert claim_run(session, run["id"], "a-trainer-that-dies")
        session.execute(
            update(TrainingRun).where(TrainingRun.id == run["id"]).values(heartbeat_at=utcnow() - timedelta(hours=1))
        )
    from shared.core.queue import make_celery

    result = reconcile_runs(services_settings, database, make_celery(services_settings))
    assert result["resumed"] >= 1  # to continue from its checkpoint (tests/integration/test_training_resume.py)
    body = client.get(f"/v1/training-runs/{run['id']}").json()
    assert body["status"] == "queued" and body["resumes"] == 1 and body["error"] is None


def test_dicom_training_data_is_stored_de_identified(client, data_dir, services_settings) -> None:
    import pydicom

    from shared.training.datasets import load_manifest

    originals = {name: (data_dir / "dicom" / f"{name}.dcm").read_bytes() for name in ("RG1_UNCR", "RG3_UNCR")}
    response = upload(
        client,
        make_zip({"CHEST/rg1.dcm": originals["RG1_UNCR"], "OTHER/rg3.dcm": originals["RG3_UNCR"]}),
        name="dicom-set",
    )
    assert response.status_code == 201, response.text
    assert response.json()["details"]["deidentified_dicom"] == 2
    store = make_object_store(services_settings)
    with database_for(services_settings).session() as session:
        manifest = load_manifest(store, session.get(Dataset, response.json()["id"]))
    for entry in manifest["files"]:
        record = entry["deidentification"]
        assert record["profile"] and "StudyInstanceUID" in record["uids_replaced"]
        stored = pydicom.dcmread(io.BytesIO(store.get(blob_key(entry["sha256"]))))
        original = pydicom.dcmread(io.BytesIO(originals["RG1_UNCR" if entry["label"] == "CHEST" else "RG3_UNCR"]))
        assert stored.StudyInstanceUID != original.StudyInstanceUID
        assert str(stored.get("PatientName", "")) != str(original.get("PatientName", "")) or not original.get(
            "PatientName"
        )
        assert stored.pixel_array.shape == original.pixel_array.shape  # the image itself is unchanged
