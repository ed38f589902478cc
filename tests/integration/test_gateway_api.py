"""The HTTP API against real Postgres, Redis and S3: what a client sees on submit, and on bad input."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import zipfile

import pytest
from sqlalchemy import select

from shared.core.storage import make_object_store
from shared.db.models import Job, JobStatus
from shared.db.session import database_for
from tests.conftest import ADMIN_HEADERS, png_bytes


def problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code
    assert body["status"] == status and body["title"]
    return body


def queued_message_ids(redis_client, prefix: str) -> list[str]:
    """Job ids waiting in the real Redis queue `predict` (under this test session's key prefix)."""
    ids = []
    for raw in redis_client.lrange(f"{prefix}predict", 0, -1):
        args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids.extend(args[0])
    return ids


def zip_bomb(expanded_bytes: int) -> bytes:
    """A small archive that would expand to `expanded_bytes` of zeros (written in chunks, not in memory)."""
    buffer = io.BytesIO()
    chunk = b"\0" * (1 << 20)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("zeros.png", "w") as entry:
        for _ in range(expanded_bytes // len(chunk)):
            entry.write(chunk)
    return buffer.getvalue()


def test_single_job_is_stored_committed_and_published(
    client, chest_images, services_settings, redis_client, redis_prefix
) -> None:
    image = chest_images["PNEUMONIA"][0]
    response = client.post("/v1/jobs", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/jobs/{body['id']}"
    assert body["status"] == "queued" and body["filename"] == image.name

    with database_for(services_settings).session() as session:
        job = session.get(Job, body["id"])
        assert job is not None and job.input_key
        stored = make_object_store(services_settings).get(job.input_key)
    assert stored == image.read_bytes()
    assert body["id"] in queued_message_ids(redis_client, redis_prefix)

    view = client.get(f"/v1/jobs/{body['id']}").json()
    assert view["status"] == "queued" and view["model"]["name"] == "chest-xray"


def test_batch_keeps_file_order_and_refuses_bad_files_individually(client, chest_images, services_settings) -> None:
    good = chest_images["NORMAL"][:3]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in good]
    files.insert(1, ("files", ("notes.png", b"not an image at all", "image/png")))
    response = client.post("/v1/batches", files=files)
    assert response.status_code == 202, response.text
    body = response.json()
    assert [j["filename"] for j in body["jobs"]] == [good[0].name, "notes.png", good[1].name, good[2].name]
    assert body["job_ids"] == [j["id"] for j in body["jobs"]]
    assert [j["status"] for j in body["jobs"]] == ["queued", "failed", "queued", "queued"]

    batch = client.get(f"/v1/batches/{body['id']}").json()
    assert batch["total"] == 4 and batch["counts"]["failed"] == 1 and batch["counts"]["queued"] == 3
    refused = batch["jobs"][1]
    assert refused["error"]["code"] == "unsupported_media_type"
    with database_for(services_settings).session() as session:
        assert session.get(Job, refused["id"]).input_key is None  # never stored, never published


def test_zip_batch_and_pagination(client, chest_images) -> None:
    buffer = io.BytesIO()
    images = chest_images["NORMAL"][:5]
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in images:
            archive.writestr(f"study/{path.name}", path.read_bytes())
    response = client.post("/v1/batches", files={"files": ("images.zip", buffer.getvalue(), "application/zip")})
    assert response.status_code == 202, response.text
    body = response.json()
    assert [j["filename"] for j in body["jobs"]] == [f"study/{p.name}" for p in images]
    first = client.get(f"/v1/batches/{body['id']}?limit=2").json()
    assert len(first["jobs"]) == 2 and first["next_cursor"]
    second = client.get(f"/v1/batches/{body['id']}?limit=2&cursor={first['next_cursor']}").json()
    assert [j["position"] for j in second["jobs"]] == [2, 3]


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("path", "upload", "status", "code"),
    [
        ("/v1/jobs", ("empty.png", b""), 400, "empty_file"),
        ("/v1/jobs", ("report.png", b"%PDF-1.7 definitely a pdf"), 415, "unsupported_media_type"),
        ("/v1/jobs", ("cut.jpeg", "TRUNCATED"), 422, "image_unreadable"),
        ("/v1/jobs", ("tiny.png", png_bytes(__import__("numpy").zeros((4, 4), "uint8"))), 422, "image_too_small"),
        ("/v1/batches", ("escape.zip", _zip({"../../x.png": b"x"})), 422, "archive_unsafe_path"),
        ("/v1/batches", ("bomb.zip", "BOMB"), 413, "archive_too_large"),
        ("/v1/batches", ("bad.zip", b"PK\x03\x04 this is no archive"), 422, "archive_unreadable"),
    ],
)
def test_bad_uploads_get_problem_json_with_stable_codes(
    client, chest_images, services_settings, path, upload, status, code
) -> None:
    name, data = upload
    if data == "TRUNCATED":
        data = chest_images["NORMAL"][0].read_bytes()[:2000]
    elif data == "BOMB":
        data = zip_bomb(services_settings.max_zip_expanded_bytes + (1 << 20))  # ~0.5 MB on the wire
    field = "file" if path == "/v1/jobs" else "files"
    with database_for(services_settings).session() as session:
        before = len(session.scalars(select(Job.id)).all())
    problem(client.post(path, files={field: (name, data, "application/octet-stream")}), status, code)
    with database_for(services_settings).session() as session:
        assert len(session.scalars(select(Job.id)).all()) == before  # nothing half-written


def test_missing_file_unknown_ids_and_unknown_model(client, chest_images) -> None:
    problem(client.post("/v1/jobs", data={"model": "chest-xray"}), 400, "missing_file")
    problem(client.get("/v1/jobs/00000000-0000-0000-0000-000000000000"), 404, "job_not_found")
    problem(client.get("/v1/batches/nope"), 404, "batch_not_found")
    problem(client.get("/v1/models/chest-xray/versions/99"), 404, "model_not_found")
    image = chest_images["NORMAL"][0]
    problem(
        client.post("/v1/jobs", files={"file": (image.name, image.read_bytes())}, data={"model": "bones"}),
        404,
        "model_not_found",
    )
    problem(
        client.post("/v1/jobs", files={"file": (image.name, image.read_bytes())}, data={"model": "chest-xray@x"}),
        422,
        "invalid_parameter",
    )


def test_oversized_request_is_refused_while_streaming(services_settings, services_model) -> None:
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app

    small = services_settings.model_copy(update={"max_request_bytes": 100_000, "max_file_bytes": 50_000})
    with TestClient(create_app(small), headers=ADMIN_HEADERS) as limited:
        problem(
            limited.post("/v1/jobs", files={"file": ("big.png", b"\x89PNG" + b"\0" * 200_000)}),
            413,
            "request_too_large",
        )
        problem(
            limited.post("/v1/jobs", files={"file": ("big.png", b"\x89PNG" + b"\0" * 60_000)}), 413, "file_too_large"
        )


def test_long_poll_returns_at_deadline_when_not_finished(client, chest_images) -> None:
    image = chest_images["NORMAL"][1]
    job_id = client.post("/v1/jobs", files={"file": (image.name, image.read_bytes())}).json()["id"]
    started = time.monotonic()
    view = client.get(f"/v1/jobs/{job_id}?wait=0.5").json()  # no worker runs in this test module
    assert view["status"] == "queued"
    assert 0.4 <= time.monotonic() - started < 5


def test_batch_long_poll_returns_at_deadline_when_not_finished(client, chest_images) -> None:
    files = [("files", (p.name, p.read_bytes())) for p in chest_images["NORMAL"][2:4]]
    batch_id = client.post("/v1/batches", files=files).json()["id"]
    started = time.monotonic()
    view = client.get(f"/v1/batches/{batch_id}?wait=0.5").json()  # no worker runs in this test module
    assert view["status"] == "queued" and view["total"] == 2
    assert 0.4 <= time.monotonic() - started < 5
    assert client.get("/v1/batches/no-such-batch?wait=5").status_code == 404


def test_batch_long_poll_is_answered_when_its_last_job_finishes(client, chest_images, services_settings) -> None:
    files = [("files", (p.name, p.read_bytes())) for p in chest_images["NORMAL"][4:7]]
    batch_id = client.post("/v1/batches", files=files).json()["id"]

    def finish_jobs_later() -> None:  # what a worker would write, without one
        time.sleep(0.3)
        with database_for(services_settings).session() as session:
            for job in session.scalars(select(Job).where(Job.batch_id == batch_id)):
                job.status, job.label, job.probabilities = JobStatus.succeeded, "NORMAL", {"NORMAL": 1.0}

    finisher = threading.Thread(target=finish_jobs_later)
    started = time.monotonic()
    finisher.start()
    view = client.get(f"/v1/batches/{batch_id}?wait=20").json()
    finisher.join()
    assert view["status"] == "succeeded" and view["counts"]["succeeded"] == 3
    assert time.monotonic() - started < 5


def test_health_readiness_models_and_metrics(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert all(check["ok"] for check in ready.json()["checks"].values())
    models = client.get("/v1/models").json()
    chest = next(m for m in models if m["name"] == "chest-xray")
    assert chest["active_version"] >= 1 and chest["classes"] == ["NORMAL", "PNEUMONIA"]
    assert "accuracy" in chest["versions"][0]["metrics"]["validation"]
    metrics = client.get("/metrics").text
    assert "xrayq_jobs_submitted_total" in metrics
    assert 'xrayq_jobs{model="chest-xray",status="queued"}' in metrics
    assert "xrayq_http_request_duration_seconds_bucket" in metrics
    assert 'xrayq_queue_depth{queue="predict"}' in metrics  # read from the real Redis
    assert 'xrayq_model_active_info{architecture="mobilenet_v3_small",model="chest-xray"' in metrics


def test_a_queued_job_can_be_cancelled_once(client, chest_images) -> None:
    image = chest_images["NORMAL"][12]
    job_id = client.post("/v1/jobs", files={"file": (image.name, image.read_bytes())}).json()["id"]
    cancelled = client.delete(f"/v1/jobs/{job_id}")  # no worker runs in this module: it is still queued
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    problem(client.delete(f"/v1/jobs/{job_id}"), 409, "job_not_cancellable")
    problem(client.delete("/v1/jobs/00000000-0000-0000-0000-000000000000"), 404, "job_not_found")


def test_cors_is_closed_unless_origins_are_configured(client, services_settings) -> None:
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app

    preflight = {"Origin": "https://viewer.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/jobs", headers=preflight).headers
    opened = services_settings.model_copy(update={"cors_origins": "https://viewer.example"})
    with TestClient(create_app(opened)) as browser:
        allowed = browser.options("/v1/jobs", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://viewer.example"
        other = browser.options("/v1/jobs", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_malformed_multipart_and_json_get_problem_json(client) -> None:
    broken = client.post(
        "/v1/jobs",
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert 400 <= broken.status_code < 500
    assert broken.headers["content-type"].startswith("application/problem+json")
    no_boundary = client.post("/v1/batches", content=b"garbage", headers={"Content-Type": "multipart/form-data"})
    assert 400 <= no_boundary.status_code < 500 and no_boundary.json()["code"]
    bad_json = client.post("/v1/api-keys", content=b"{not json", headers={"Content-Type": "application/json"})
    problem(bad_json, 422, "invalid_request")
    for odd in ("../../etc/passwd.png", "ｘｒａｙ\u202e.png", "a" * 1000 + ".png", "\x00\x1f.png"):
        image = b"\x89PNG\r\n\x1a\n" + b"\x00" * 50  # refused as unreadable, but the name is handled
        response = client.post("/v1/jobs", files={"file": (odd, image)})
        problem(response, 422, "image_unreadable")
