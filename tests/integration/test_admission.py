"""The gateway's group commit for single jobs, against real Postgres, Redis and S3: submissions that
wait together are stored, committed and published together; each still gets its own outcome."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from sqlalchemy import select

from services.gateway.admission import AdmissionQueue
from shared.core.errors import XrayqError
from shared.core.queue import make_celery
from shared.core.storage import make_object_store
from shared.db.models import Job, JobStatus
from shared.db.session import database_for
from shared.intake.upload import Upload
from tests.integration.test_gateway_api import queued_message_ids


class GatedStore:
    """The real object store, whose first put waits until the test opens the gate."""

    def __init__(self, store) -> None:
        self.store = store
        self.gate = threading.Event()
        self.first_put_started = threading.Event()

    def put(self, *args) -> None:
        if not self.first_put_started.is_set():
            self.first_put_started.set()
            assert self.gate.wait(30)
        self.store.put(*args)


@pytest.fixture
def isolated(services_settings, services_model, redis_prefix):
    """Settings whose messages go to a queue of this test's own."""
    return services_settings.model_copy(update={"broker_key_prefix": f"{redis_prefix}admission-{uuid.uuid4().hex}:"})


def uploads(chest_images, count: int) -> list[Upload]:
    return [Upload(p.name, p.read_bytes(), "image/jpeg") for p in chest_images["PNEUMONIA"][20 : 20 + count]]


def test_waiting_submissions_are_committed_and_published_as_one_group(isolated, chest_images, redis_client) -> None:
    store = GatedStore(make_object_store(isolated))
    queue = AdmissionQueue(isolated, database_for(isolated), store, make_celery(isolated, "test-admission"))
    first, *rest = uploads(chest_images, 11)

    async def scenario() -> list[Job]:
        head = asyncio.create_task(queue.submit(first, model_ref="chest-xray", client_ref="a", organisation=None))
        await asyncio.to_thread(store.first_put_started.wait, 30)  # the first group is being admitted
        tail = [
            asyncio.create_task(queue.submit(u, model_ref="chest-xray", client_ref="b", organisation="org-b"))
            for u in rest
        ]
        await asyncio.sleep(0.05)
        store.gate.set()
        return await asyncio.gather(head, *tail)

    jobs = asyncio.run(scenario())
    assert len({job.id for job in jobs}) == 11 and all(job.status == JobStatus.queued for job in jobs)
    with database_for(isolated).session() as session:
        rows = {row.id: row for row in session.scalars(select(Job).where(Job.id.in_([j.id for j in jobs])))}
        assert len(rows) == 11
        for job, upload in zip(jobs, [first, *rest], strict=True):
            assert store.store.get(rows[job.id].input_key) == upload.data
            assert rows[job.id].filename == upload.filename
        assert rows[jobs[0].id].client_ref == "a" and rows[jobs[1].id].organisation == "org-b"
    # Two groups (the first alone, then the ten that waited behind it): two messages, every id once.
    raw = redis_client.lrange(f"{isolated.broker_key_prefix}predict", 0, -1)
    assert len(raw) == 2
    assert sorted(queued_message_ids(redis_client, isolated.broker_key_prefix)) == sorted(j.id for j in jobs)


def test_one_bad_model_fails_its_request_alone(isolated, chest_images) -> None:
    queue = AdmissionQueue(isolated, database_for(isolated), make_object_store(isolated), make_celery(isolated))
    good, bad = uploads(chest_images, 2)

    async def scenario():
        return await asyncio.gather(
            queue.submit(good, model_ref="chest-xray", client_ref=None, organisation=None),
            queue.submit(bad, model_ref="no-such-model", client_ref=None, organisation=None),
            return_exceptions=True,
        )

    job, error = asyncio.run(scenario())
    assert isinstance(job, Job) and job.status == JobStatus.queued
    assert isinstance(error, XrayqError) and error.code == "model_not_found"


def test_a_broken_store_fails_the_group_and_commits_nothing(isolated, chest_images) -> None:
    class BrokenStore:
        def put(self, *args) -> None:
            raise ConnectionError("storage is down")

    queue = AdmissionQueue(isolated, database_for(isolated), BrokenStore(), make_celery(isolated))
    batch = uploads(chest_images, 3)
    marker = f"broken-{uuid.uuid4().hex}"

    async def scenario():
        return await asyncio.gather(
            *(queue.submit(u, model_ref="chest-xray", client_ref=marker, organisation=None) for u in batch),
            return_exceptions=True,
        )

    outcomes = asyncio.run(scenario())
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    with database_for(isolated).session() as session:
        assert not session.scalars(select(Job).where(Job.client_ref == marker)).all()
