"""The worker's prediction step against real Postgres and S3: batching, idempotency, isolation of bad inputs."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import update

from services.worker.inference import ModelCache, Predictor
from shared.core.storage import make_object_store
from shared.db.models import Job, JobStatus
from shared.db.session import database_for
from shared.intake.upload import Upload
from shared.jobs.views import get_job
from tests.integration.conftest import submit as submit_jobs


def make_predictor(settings) -> Predictor:
    store = make_object_store(settings)
    return Predictor(settings, database_for(settings), store, ModelCache(store, torch.device("cpu")))


@pytest.fixture
def predictor(services_settings, services_model) -> Predictor:
    # Coalescing off: these tests count exactly the jobs of their own messages.
    return make_predictor(services_settings.model_copy(update={"coalesce_singles": False}))


def submit(settings, uploads: list[Upload], as_batch: bool = True) -> list[str]:
    """No worker consumes the messages: the tests run the predictor on them themselves."""
    return [job.id for job in submit_jobs(settings, uploads, as_batch=as_batch)]


def test_one_forward_pass_serves_the_chunk_and_results_are_complete(
    predictor, services_settings, chest_images, services_model
) -> None:
    paths = chest_images["NORMAL"][:3] + chest_images["PNEUMONIA"][:3]
    ids = submit(services_settings, [Upload(p.name, p.read_bytes(), "image/jpeg") for p in paths])
    assert predictor.run(ids) == {"claimed": 6}
    with database_for(services_settings).session() as session:
        jobs = [get_job(session, job_id) for job_id in ids]
        for job in jobs:
            assert job.status == JobStatus.succeeded
            assert job.label in ("NORMAL", "PNEUMONIA")
            assert sum(job.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
            assert job.model_version.version == services_model["version"]
            assert job.timings["batch_size"] == 6  # one tensor batch for the whole chunk
            assert job.attempts == 1


def test_redelivery_never_rewrites_a_finished_job(predictor, services_settings, chest_images) -> None:
    ids = submit(services_settings, [Upload("a.jpeg", chest_images["NORMAL"][5].read_bytes(), "image/jpeg")])
    predictor.run(ids)
    with database_for(services_settings).session() as session:
        first = get_job(session, ids[0])
        finished, probabilities = first.finished_at, dict(first.probabilities)
    assert predictor.run(ids) == {"claimed": 0}  # the same message delivered again
    with database_for(services_settings).session() as session:
        again = get_job(session, ids[0])
        assert again.finished_at == finished and again.probabilities == probabilities and again.attempts == 1


def test_an_unreadable_input_fails_alone(predictor, services_settings, chest_images) -> None:
    good = chest_images["PNEUMONIA"][5].read_bytes()
    ids = submit(
        services_settings,
        [
            Upload("good.jpeg", good, "image/jpeg"),
            Upload("bad.jpeg", good, "image/jpeg"),
            Upload("good2.jpeg", good, "image/jpeg"),
        ],
    )
    store = make_object_store(services_settings)
    with database_for(services_settings).session() as session:
        bad = session.get(Job, ids[1])
        store.put(bad.input_key, good[:1500])  # corrupted in storage after it was accepted
    predictor.run(ids)
    with database_for(services_settings).session() as session:
        statuses = [get_job(session, job_id).status for job_id in ids]
        bad = get_job(session, ids[1])
    assert statuses == [JobStatus.succeeded, JobStatus.failed, JobStatus.succeeded]
    assert bad.error_code == "image_unreadable"


def test_a_job_that_keeps_failing_its_worker_ends_failed(predictor, services_settings, chest_images) -> None:
    ids = submit(services_settings, [Upload("x.jpeg", chest_images["NORMAL"][6].read_bytes(), "image/jpeg")])
    with database_for(services_settings).session() as session:
        session.get(Job, ids[0]).attempts = services_settings.max_attempts  # earlier deliveries died mid-way
    predictor.run(ids)
    with database_for(services_settings).session() as session:
        job = get_job(session, ids[0])
        assert job.status == JobStatus.failed and job.error_code == "too_many_attempts"


def test_a_single_jobs_message_takes_other_waiting_singles_into_its_forward_pass(
    services_settings, services_model, chest_images
) -> None:
    predictor = make_predictor(services_settings)
    # Only these five may be waiting: singles left queued by other tests share the database, and the
    # claim takes the oldest first.
    with database_for(services_settings).session() as session:
        session.execute(
            update(Job).where(Job.status == JobStatus.queued, Job.batch_id.is_(None)).values(status=JobStatus.cancelled)
        )
    ids = [
        submit(services_settings, [Upload(p.name, p.read_bytes(), "image/jpeg")], as_batch=False)[0]
        for p in chest_images["PNEUMONIA"][20:25]
    ]
    assert predictor.run(ids[:1])["claimed"] >= 5  # the first message serves all five waiting singles
    with database_for(services_settings).session() as session:
        jobs = [get_job(session, job_id) for job_id in ids]
        assert all(job.status == JobStatus.succeeded for job in jobs)
        assert min(job.timings["batch_size"] for job in jobs) >= 5
    assert all(predictor.run([job_id]) == {"claimed": 0} for job_id in ids[1:])  # their own messages: no-ops
