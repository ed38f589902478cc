"""Every transition of a job (shared/jobs/lifecycle.py) against real Postgres: claim, result written once,
failure with its code, the attempts limit, cancel only from queued, stale and lost jobs found again."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text

from shared.core.errors import XrayqError
from shared.core.queue import make_celery
from shared.core.storage import make_object_store
from shared.db.models import Job, JobStatus, utcnow
from shared.db.session import database_for
from shared.intake.upload import Upload
from shared.jobs.creation import JobRequest, create_jobs
from shared.jobs.lifecycle import Prediction, cancel_job, claim_jobs, jobs_to_republish, record_outcomes
from tests.integration.conftest import submit

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(services_settings, services_model, redis_prefix):
    """Messages to a queue of this test's own; claims take only the message's jobs (no coalescing)."""
    return services_settings.model_copy(
        update={"broker_key_prefix": f"{redis_prefix}lifecycle-{uuid.uuid4().hex}:", "coalesce_singles": False}
    )


@pytest.fixture
def image(chest_images) -> bytes:
    return chest_images["NORMAL"][7].read_bytes()


def make_jobs(settings, image: bytes, count: int, organisation: str | None = None) -> list[str]:
    uploads = [Upload(f"{index}.jpeg", image, "image/jpeg") for index in range(count)]
    request = JobRequest(uploads, "chest-xray", organisation=organisation)
    with database_for(settings).session() as session:
        (created,) = create_jobs(session, make_object_store(settings), make_celery(settings), [request], chunk_size=32)
    return [job.id for job in created.jobs]


def claim(settings, job_ids: list[str], redelivered: bool = False):
    with database_for(settings).session() as session:
        return claim_jobs(session, job_ids, settings, redelivered=redelivered)


def row(settings, job_id: str) -> Job:
    with database_for(settings).session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_a_claim_marks_the_job_running_counts_the_attempt_and_names_the_answering_version(
    settings, image, services_model
) -> None:
    (job_id,) = make_jobs(settings, image, 1)
    claimed = claim(settings, [job_id])
    assert [job.id for job in claimed.jobs] == [job_id]
    assert claimed.jobs[0].timings["queue_ms"] >= 0
    version = claimed.versions[("chest-xray", None)]
    assert not isinstance(version, XrayqError) and version.version == services_model["version"]
    job = row(settings, job_id)
    assert job.status == JobStatus.running and job.attempts == 1 and job.started_at is not None


def test_a_result_is_written_once(settings, image) -> None:
    (job_id,) = make_jobs(settings, image, 1)
    claimed = claim(settings, [job_id])
    job, version = claimed.jobs[0], claimed.versions[("chest-xray", None)]
    assert not isinstance(version, XrayqError)
    with database_for(settings).session() as session:
        record_outcomes(session, predictions=[Prediction(job, "NORMAL", {"NORMAL": 0.9, "PNEUMONIA": 0.1}, version.id)])
    first = row(settings, job_id)
    # The same message delivered again: its late outcomes, of either kind, change nothing.
    with database_for(settings).session() as session:
        record_outcomes(
            session, predictions=[Prediction(job, "PNEUMONIA", {"NORMAL": 0.2, "PNEUMONIA": 0.8}, version.id)]
        )
        record_outcomes(session, failures=[(job, XrayqError("image_unreadable", "late"))])
    assert claim(settings, [job_id]).jobs == []
    again = row(settings, job_id)
    assert again.status == JobStatus.succeeded and again.label == "NORMAL" and again.error_code is None
    assert again.probabilities == {"NORMAL": 0.9, "PNEUMONIA": 0.1} and again.model_version_id == version.id
    assert again.finished_at == first.finished_at and again.attempts == 1
    assert again.timings is not None and again.timings["total_ms"] > 0


def test_a_failure_is_recorded_with_its_code_and_is_final(settings, image) -> None:
    good, bad = make_jobs(settings, image, 2)
    claimed_now = claim(settings, [good, bad])
    claimed, version = {job.id: job for job in claimed_now.jobs}, claimed_now.versions[("chest-xray", None)]
    assert not isinstance(version, XrayqError)
    with database_for(settings).session() as session:
        record_outcomes(session, failures=[(claimed[bad], XrayqError("image_unreadable", "Not an image."))])
    failed = row(settings, bad)
    assert failed.status == JobStatus.failed and failed.finished_at is not None
    assert (failed.error_code, failed.error_detail, failed.label) == ("image_unreadable", "Not an image.", None)
    assert row(settings, good).status == JobStatus.running  # its neighbour is untouched
    with database_for(settings).session() as session:
        record_outcomes(session, predictions=[Prediction(claimed[bad], "NORMAL", {"NORMAL": 1.0}, version.id)])
    assert row(settings, bad).status == JobStatus.failed and row(settings, bad).label is None


def test_past_the_attempts_limit_a_job_fails_with_too_many_attempts(settings, image) -> None:
    limited = settings.model_copy(update={"max_attempts": 2})
    (job_id,) = make_jobs(limited, image, 1)
    for attempt in (1, 2):  # each time the worker dies before writing anything, and the broker redelivers
        assert [job.id for job in claim(limited, [job_id], redelivered=True).jobs] == [job_id]
        assert row(limited, job_id).attempts == attempt
    assert claim(limited, [job_id], redelivered=True).jobs == []  # the third delivery gives up instead of running it
    job = row(limited, job_id)
    assert job.status == JobStatus.failed and job.error_code == "too_many_attempts"
    assert job.error_detail == "Gave up after 2 attempts." and job.finished_at is not None
    assert claim(limited, [job_id]).jobs == []  # and it stays failed


def test_only_a_queued_job_can_be_cancelled_and_workers_skip_it(settings, image) -> None:
    waiting, taken = make_jobs(settings, image, 2, organisation="org-a")
    claim(settings, [taken])
    with database_for(settings).session() as session:
        with pytest.raises(XrayqError) as other:
            cancel_job(session, waiting, "org-b")
        assert other.value.code == "job_not_found"
        cancelled = cancel_job(session, waiting, "org-a")
        assert cancelled.status == JobStatus.cancelled and cancelled.error_code == "cancelled"
    with database_for(settings).session() as session:
        for job_id in (waiting, taken):
            with pytest.raises(XrayqError) as refused:
                cancel_job(session, job_id)
            assert refused.value.code == "job_not_cancellable"
    assert row(settings, taken).status == JobStatus.running
    assert claim(settings, [waiting]).jobs == []
    assert row(settings, waiting).status == JobStatus.cancelled and row(settings, waiting).attempts == 0


def test_stale_running_and_lost_queued_jobs_are_found_and_claimed_again(settings, image) -> None:
    stale, busy, lost, fresh = make_jobs(settings, image, 4)
    claim(settings, [stale, busy])
    with database_for(settings).session() as session:
        session.get(Job, stale).started_at = utcnow() - timedelta(seconds=settings.stale_running_after_s + 5)
        session.get(Job, lost).created_at = utcnow() - timedelta(seconds=settings.requeue_after_s + 5)
    # Busy: the oldest waiting message was published before any of these jobs, so theirs may still be behind it.
    busy_since = utcnow() - timedelta(seconds=settings.requeue_after_s + 60)
    with database_for(settings).session() as session:
        while_busy = set(jobs_to_republish(session, settings, drained_before=busy_since, limit=100_000))
        while_empty = set(jobs_to_republish(session, settings, drained_before=utcnow(), limit=100_000))
    # The queue may still carry the queued job's message: only the dead worker's job is lost.
    assert stale in while_busy and not {busy, lost, fresh} & while_busy
    assert {stale, lost} <= while_empty and not {busy, fresh} & while_empty
    # Republished, the stale job is claimed again, its attempt counted.
    assert [job.id for job in claim(settings, [stale]).jobs] == [stale]
    assert row(settings, stale).attempts == 2 and row(settings, stale).status == JobStatus.running


def test_two_workers_coalescing_at_once_never_claim_the_same_job(settings, image) -> None:
    """Postgres: the second claim skips the rows the first holds (SKIP LOCKED) instead of waiting for them."""
    coalescing = settings.model_copy(update={"coalesce_singles": True, "predict_chunk_size": 4})
    singles = make_jobs(coalescing, image, 6)
    # A batch's job is never coalesced into another message.
    batch_job = submit(coalescing, [Upload("b.jpeg", image, "image/jpeg")], as_batch=True)[0].id
    database = database_for(coalescing)
    first, second = database.sessions(), database.sessions()
    try:
        taken = {job.id for job in claim_jobs(first, singles[:1], coalescing).jobs}  # not committed: rows locked
        second.execute(text("SET LOCAL lock_timeout = '5s'"))  # waiting on the first would fail, not hang
        other = {job.id for job in claim_jobs(second, [batch_job], coalescing).jobs}
        assert len(taken) == 4 and singles[0] in taken
        assert batch_job in other and len(other) >= 3  # at least two of the six were left for it
        assert not taken & other
    finally:
        # Rolled back: other tests' waiting singles that were coalesced here stay queued.
        for session in (first, second):
            session.rollback()
            session.close()
