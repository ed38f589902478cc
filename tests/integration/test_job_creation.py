"""The one creation path (shared/jobs/creation.py) against real Postgres, Redis and S3: inputs stored, rows
committed, then ids published, in that order; each request answered on its own; nothing half-made."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from shared.core.errors import XrayqError
from shared.core.queue import make_celery
from shared.core.storage import make_object_store
from shared.db.models import Batch, Job, JobStatus
from shared.db.session import database_for
from shared.intake.upload import Upload
from shared.jobs.creation import Created, JobRequest, create_jobs
from tests.integration.test_gateway_api import queued_message_ids

pytestmark = pytest.mark.integration


@pytest.fixture
def isolated(services_settings, services_model, redis_prefix):
    """Settings whose messages go to a queue of this test's own."""
    return services_settings.model_copy(update={"broker_key_prefix": f"{redis_prefix}creation-{uuid.uuid4().hex}:"})


class CheckedCelery:
    """The real Celery app; before each publish it checks, from another connection, that every published
    job's row is committed and its input stored."""

    def __init__(self, settings) -> None:
        self.celery = make_celery(settings)
        self.database = database_for(settings)
        self.store = make_object_store(settings)
        self.published: list[list[str]] = []

    def send_task(self, name, args, **options):
        with self.database.session() as session:
            for job_id in args[0]:
                job = session.get(Job, job_id)
                assert job is not None and job.status == JobStatus.queued, "published before its commit"
                assert job.input_key is not None and self.store.exists(job.input_key)
        self.published.append(list(args[0]))
        return self.celery.send_task(name, args=args, **options)


def images(chest_images, count: int) -> list[Upload]:
    return [Upload(p.name, p.read_bytes(), "image/jpeg") for p in chest_images["PNEUMONIA"][30 : 30 + count]]


def test_requests_are_stored_committed_then_published_together_and_answered_each(
    isolated, chest_images, redis_client
) -> None:
    a, b, c = images(chest_images, 3)
    refused = Upload("note.txt", b"not an image", None, XrayqError("unsupported_media_type", "Not an image."))
    requests = [
        JobRequest([a, refused], "chest-xray", client_ref="first", organisation="org-a"),
        JobRequest([b], "no-such-model"),
        JobRequest([c], "chest-xray", client_ref="third"),
    ]
    celery = CheckedCelery(isolated)
    with database_for(isolated).session() as session:
        outcomes = create_jobs(session, make_object_store(isolated), celery, requests, chunk_size=32)
    assert [outcome.request for outcome in outcomes] == requests
    first, second, third = outcomes
    assert second.error is not None and second.error.code == "model_not_found" and second.jobs == []
    assert first.error is None and third.error is None
    assert [job.filename for job in first.jobs] == [a.filename, "note.txt"]
    assert [job.position for job in first.jobs] == [0, 1]
    queued = [first.jobs[0].id, third.jobs[0].id]
    assert celery.published == [queued]  # one message for every request of the call
    assert queued_message_ids(redis_client, isolated.broker_key_prefix) == queued
    with database_for(isolated).session() as session:
        failed = session.get(Job, first.jobs[1].id)
        assert failed is not None and failed.status == JobStatus.failed
        assert failed.error_code == "unsupported_media_type" and failed.input_key is None
        assert session.get(Job, first.jobs[0].id).organisation == "org-a"
        assert session.get(Job, third.jobs[0].id).client_ref == "third"


def test_a_request_no_model_can_answer_stores_and_commits_nothing(isolated, chest_images) -> None:
    stored: list[str] = []

    class RecordingStore:
        def put(self, key, *args) -> None:
            stored.append(key)

    marker = f"refused-{uuid.uuid4().hex}"
    celery = CheckedCelery(isolated)
    with database_for(isolated).session() as session:
        (outcome,) = create_jobs(
            session,
            RecordingStore(),
            celery,
            [JobRequest(images(chest_images, 2), "chest-xray@999", client_ref=marker)],
            chunk_size=32,
        )
    assert outcome.error is not None and outcome.error.code == "model_not_found"
    assert stored == [] and celery.published == []
    with database_for(isolated).session() as session:
        assert not session.scalars(select(Job).where(Job.client_ref == marker)).all()


def test_arrange_places_the_rows_in_the_same_commit_and_may_leave_jobs_out(isolated, chest_images) -> None:
    batch_id = uuid.uuid4().hex

    def into_one_batch(session, created: list[Created]) -> None:
        kept = created[0].jobs[:2]  # the third is left out (as a study leaves out a duplicate instance)
        session.add(Batch(id=batch_id, model_name=created[0].model_name, total=len(kept)))
        for job in kept:
            job.batch_id = batch_id
        created[0].jobs = kept

    celery = CheckedCelery(isolated)
    with database_for(isolated).session() as session:
        (outcome,) = create_jobs(
            session,
            make_object_store(isolated),
            celery,
            [JobRequest(images(chest_images, 3), "chest-xray", pin_active_version=True)],
            chunk_size=32,
            arrange=into_one_batch,
        )
    assert len(outcome.jobs) == 2 and celery.published == [[job.id for job in outcome.jobs]]
    with database_for(isolated).session() as session:
        rows = session.scalars(select(Job).where(Job.batch_id == batch_id)).all()
        assert {job.id for job in rows} == {job.id for job in outcome.jobs}
        # A pinned request answers with the version active now, whatever is promoted meanwhile.
        assert all(job.model_version_requested is not None for job in rows)


def test_an_arrangement_that_fails_commits_and_publishes_nothing(isolated, chest_images) -> None:
    marker = f"broken-{uuid.uuid4().hex}"

    def refuse(session, created: list[Created]) -> None:
        raise XrayqError("internal_error", "Could not open or join the study batch.")

    celery = CheckedCelery(isolated)
    with pytest.raises(XrayqError), database_for(isolated).session() as session:
        create_jobs(
            session,
            make_object_store(isolated),
            celery,
            [JobRequest(images(chest_images, 2), "chest-xray", client_ref=marker)],
            chunk_size=32,
            arrange=refuse,
        )
    assert celery.published == []
    with database_for(isolated).session() as session:
        assert not session.scalars(select(Job).where(Job.client_ref == marker)).all()
