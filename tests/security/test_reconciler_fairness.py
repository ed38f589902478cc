"""Finding 12: the reconciler never fails healthy jobs, and finds a lost message in a busy queue.

Against the real Postgres and Redis (a `predict` queue of this test's own), the real reconciler and the
real worker `Predictor`: a worker outage that lasts several reconcile passes leaves the jobs' attempts
as they were and piles up no copies, and when workers return (several at once, as a pool does) every
job succeeds; a message deleted from a queue that never empties is republished all the same.
"""

from __future__ import annotations

import base64
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
from sqlalchemy import update

from services.worker.inference import ModelCache, Predictor
from shared.core.queue import make_celery
from shared.core.storage import make_object_store
from shared.db.models import Job, JobStatus, utcnow
from shared.db.session import database_for
from shared.intake.upload import Upload
from shared.jobs.creation import JobRequest, create_jobs
from shared.jobs.lifecycle import claim_jobs
from shared.jobs.reconciler import reconcile_once
from tests.integration.conftest import redis_client  # noqa: F401  (a client of the real Redis, as a fixture)

pytestmark = pytest.mark.integration

PASSES = 5  # reconcile passes while no worker runs
POOL = 4  # worker processes that come back at once


@pytest.fixture
def settings(services_settings, services_model, redis_prefix):
    """Messages to a queue of this test's own; claims take only the message's jobs."""
    return services_settings.model_copy(
        update={"broker_key_prefix": f"{redis_prefix}fairness-{uuid.uuid4().hex}:", "coalesce_singles": False}
    )


def make_jobs(settings, images: list[bytes], organisation: str) -> list[str]:
    """Jobs made as the gateway makes them: stored, committed, then published to the queue."""
    uploads = [Upload(f"{index}.jpeg", image, "image/jpeg") for index, image in enumerate(images)]
    with database_for(settings).session() as session:
        (created,) = create_jobs(
            session,
            make_object_store(settings),
            make_celery(settings),
            [JobRequest(uploads, "chest-xray", organisation=organisation)],
            chunk_size=len(uploads),
        )
    return [job.id for job in created.jobs]


def messages(redis_client, settings, only: set[str] | None = None) -> list[list[str]]:  # noqa: F811
    """The job ids of each message waiting on this test's queue, oldest first (`only` these ids: jobs
    that other tests left behind in the shared database are republished here too)."""
    raw = redis_client.lrange(f"{settings.broker_key_prefix}predict", 0, -1)
    found = [json.loads(base64.b64decode(json.loads(item)["body"]))[0][0] for item in reversed(raw)]
    if only is None:
        return found
    return [kept for message in found if (kept := [job_id for job_id in message if job_id in only])]


def take_all(redis_client, settings) -> list[list[str]]:  # noqa: F811
    """Every waiting message, taken off the queue as workers take them."""
    taken = messages(redis_client, settings)
    redis_client.delete(f"{settings.broker_key_prefix}predict")
    return taken


def jobs(settings, job_ids: list[str]) -> list[Job]:
    with database_for(settings).session() as session:
        return [session.get(Job, job_id) for job_id in job_ids]


def age(settings, job_ids: list[str], **columns: object) -> None:
    with database_for(settings).session() as session:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(**columns))


def workers_return(settings, taken: list[list[str]]) -> None:
    """A pool of worker processes runs the waiting messages, several at the same moment."""
    store = make_object_store(settings)
    predictors = [
        Predictor(settings, database_for(settings), store, ModelCache(store, torch.device("cpu"))) for _ in range(POOL)
    ]
    with ThreadPoolExecutor(POOL) as pool:
        list(pool.map(lambda item: predictors[item[0] % POOL].run(item[1]), enumerate(taken)))


def test_a_worker_outage_costs_no_attempts_and_every_job_succeeds_when_workers_return(
    settings,
    chest_images,
    redis_client,  # noqa: F811
) -> None:
    images = [path.read_bytes() for path in chest_images["NORMAL"][30:33]]
    waiting = make_jobs(settings, images, "org-a")
    interrupted = make_jobs(settings, images, "org-b")
    # Organisation B's jobs were claimed by a worker that then died, and the broker lost every message
    # (Redis restarted without its data); it all happened a while ago.
    with database_for(settings).session() as session:
        assert len(claim_jobs(session, interrupted, settings).jobs) == len(interrupted)
    redis_client.delete(f"{settings.broker_key_prefix}predict")
    long_ago = utcnow() - timedelta(seconds=settings.stale_running_after_s + settings.requeue_after_s + 60)
    age(settings, waiting + interrupted, created_at=long_ago)
    age(settings, interrupted, started_at=long_ago)

    # No worker runs while the reconciler makes several passes.
    for _ in range(PASSES):
        reconcile_once(settings, database_for(settings), make_celery(settings))
    queued_ids = [job_id for message in messages(redis_client, settings) for job_id in message]
    for job_id in waiting + interrupted:
        assert queued_ids.count(job_id) == 1, "one copy of each lost message, however long the outage"
    assert [job.attempts for job in jobs(settings, waiting)] == [0] * len(waiting)
    assert [job.attempts for job in jobs(settings, interrupted)] == [1] * len(interrupted)

    # Workers return, several at once; a second gateway's reconciler had sent the same copies.
    taken = take_all(redis_client, settings)
    workers_return(settings, taken + taken)
    for job in jobs(settings, waiting):
        assert (job.status, job.error_code, job.attempts) == (JobStatus.succeeded, None, 1)
    for job in jobs(settings, interrupted):
        assert (job.status, job.error_code, job.attempts) == (JobStatus.succeeded, None, 2)


def test_a_message_deleted_from_a_busy_queue_is_republished_while_the_queue_is_not_empty(
    settings,
    chest_images,
    redis_client,  # noqa: F811
) -> None:
    images = [path.read_bytes() for path in chest_images["PNEUMONIA"][30:32]]
    (lost,) = make_jobs(settings, images[:1], "org-a")
    # Its message is deleted from the queue; the job was published a while ago.
    redis_client.delete(f"{settings.broker_key_prefix}predict")
    age(settings, [lost], created_at=utcnow() - timedelta(seconds=settings.requeue_after_s + 60))
    # Since then the queue has drained past it and stays busy: newer messages keep it non-empty.
    busy = make_jobs(settings, images, "org-b")
    mine = {lost, *busy}
    assert messages(redis_client, settings, mine) == [busy]

    reconcile_once(settings, database_for(settings), make_celery(settings))
    assert messages(redis_client, settings, mine) == [busy, [lost]]
    reconcile_once(settings, database_for(settings), make_celery(settings))  # its new copy is on its way
    assert messages(redis_client, settings, mine) == [busy, [lost]]

    workers_return(settings, take_all(redis_client, settings))
    for job in jobs(settings, [lost, *busy]):
        assert (job.status, job.attempts) == (JobStatus.succeeded, 1)
