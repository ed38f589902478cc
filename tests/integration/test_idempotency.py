"""Idempotency-Key on submissions, against the real Postgres: retries and races never create new jobs."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func, select

from shared.db.models import Job
from shared.db.session import database_for


def job_count(settings) -> int:
    with database_for(settings).session() as session:
        return session.scalar(select(func.count()).select_from(Job))


def test_same_key_and_request_return_the_original_job(client, chest_images, services_settings) -> None:
    image = chest_images["NORMAL"][7]
    key = f"retry-{uuid.uuid4()}"
    files = {"file": (image.name, image.read_bytes(), "image/jpeg")}
    first = client.post("/v1/jobs", files=files, headers={"Idempotency-Key": key})
    before = job_count(services_settings)
    again = client.post("/v1/jobs", files=files, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert job_count(services_settings) == before


def test_same_key_with_another_request_is_a_conflict(client, chest_images, services_settings) -> None:
    key = f"conflict-{uuid.uuid4()}"
    a, b = chest_images["NORMAL"][8], chest_images["NORMAL"][9]
    assert (
        client.post("/v1/jobs", files={"file": (a.name, a.read_bytes())}, headers={"Idempotency-Key": key}).status_code
        == 202
    )
    before = job_count(services_settings)
    response = client.post("/v1/jobs", files={"file": (b.name, b.read_bytes())}, headers={"Idempotency-Key": key})
    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_key_conflict"
    assert job_count(services_settings) == before


def test_racing_batches_with_one_key_create_one_batch(client, chest_images, services_settings) -> None:
    key = f"race-{uuid.uuid4()}"
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in chest_images["PNEUMONIA"][30:34]]
    before = job_count(services_settings)

    def submit(_: int):
        return client.post("/v1/batches", files=files, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(submit, range(4)))
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len({tuple(r.json()["job_ids"]) for r in responses}) == 1
    assert job_count(services_settings) == before + 4
