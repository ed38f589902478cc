"""Lost messages are republished from the database, against the real Postgres and Redis."""

from __future__ import annotations

from datetime import timedelta

from shared.core.queue import make_celery
from shared.core.storage import make_object_store
from shared.db.models import Job, JobStatus, utcnow
from shared.db.session import database_for
from shared.intake.upload import Upload
from shared.jobs.reconciler import reconcile_once
from tests.integration.conftest import submit
from tests.integration.test_gateway_api import queued_message_ids


def old_job(settings, image: bytes, status: JobStatus, age_s: float) -> str:
    """A job submitted as the gateway does it (and published), then aged and moved to `status`."""
    job_id = submit(settings, [Upload("x.jpeg", image, "image/jpeg")])[0].id
    with database_for(settings).session() as session:
        job = session.get(Job, job_id)
        job.status = status
        job.created_at = utcnow() - timedelta(seconds=age_s)
        job.started_at = job.created_at if status == JobStatus.running else None
        return job.id


def test_lost_queued_and_stale_running_jobs_are_republished(
    services_settings, services_model, chest_images, redis_client, redis_prefix
) -> None:
    image = chest_images["NORMAL"][3].read_bytes()
    lost = old_job(services_settings, image, JobStatus.queued, age_s=services_settings.requeue_after_s + 5)
    fresh = old_job(services_settings, image, JobStatus.queued, age_s=0)
    stale = old_job(services_settings, image, JobStatus.running, age_s=services_settings.stale_running_after_s + 5)
    busy = old_job(services_settings, image, JobStatus.running, age_s=1)
    redis_client.delete(f"{redis_prefix}predict")  # the broker lost everything

    celery = make_celery(services_settings)
    assert reconcile_once(services_settings, database_for(services_settings), celery) >= 2
    published = set(queued_message_ids(redis_client, redis_prefix))
    assert {lost, stale} <= published
    assert not {fresh, busy} & published


def test_a_busy_queue_is_not_mistaken_for_lost_messages(
    services_settings, services_model, chest_images, redis_client, redis_prefix
) -> None:
    image = chest_images["NORMAL"][4].read_bytes()
    celery = make_celery(services_settings)
    waiting = old_job(services_settings, image, JobStatus.queued, age_s=services_settings.requeue_after_s + 5)
    redis_client.delete(f"{redis_prefix}predict")
    celery.send_task("xrayq.predict", args=[[waiting]], queue="predict")  # still on its way
    reconcile_once(services_settings, database_for(services_settings), celery)
    assert queued_message_ids(redis_client, redis_prefix).count(waiting) == 1
    with database_for(services_settings).session() as session:
        assert session.get(Job, waiting).status == JobStatus.queued


def test_inputs_of_long_finished_jobs_are_purged_and_results_kept(services_settings, services_model, chest_images):
    from shared.jobs.reconciler import purge_old_inputs

    image = chest_images["NORMAL"][5].read_bytes()
    old = old_job(services_settings, image, JobStatus.queued, age_s=0)
    recent = old_job(services_settings, image, JobStatus.queued, age_s=0)
    store = make_object_store(services_settings)
    with database_for(services_settings).session() as session:
        for job_id, days in ((old, services_settings.input_retention_days + 1), (recent, 1)):
            job = session.get(Job, job_id)
            job.status, job.label = JobStatus.succeeded, "NORMAL"
            job.finished_at = utcnow() - timedelta(days=days)
        old_key = session.get(Job, old).input_key
    assert purge_old_inputs(services_settings, database_for(services_settings)) >= 1
    assert not store.exists(old_key)
    with database_for(services_settings).session() as session:
        assert session.get(Job, old).input_key is None and session.get(Job, old).label == "NORMAL"
        assert session.get(Job, recent).input_key is not None


def test_inputs_no_job_refers_to_are_swept_after_the_grace(services_settings, services_model, chest_images):
    """A submission that failed after storing its input (no row committed) leaves an object that only
    the sweeper deletes; the inputs of real jobs stay."""
    import uuid

    from shared.jobs.reconciler import sweep_orphaned_inputs

    store = make_object_store(services_settings)
    database = database_for(services_settings)
    image = chest_images["NORMAL"][13].read_bytes()
    (job,) = submit(services_settings, [Upload("kept.jpeg", image, "image/jpeg")])
    orphan = f"inputs/{utcnow():%Y/%m/%d}/{uuid.uuid4()}"
    store.put(orphan, image)

    assert orphan not in sweep_orphaned_inputs(services_settings, database, store)  # still within the grace
    assert store.exists(orphan)

    past_grace = services_settings.model_copy(update={"orphaned_input_grace_s": 1e-6})
    swept = sweep_orphaned_inputs(past_grace, database, store)
    assert orphan in swept and not store.exists(orphan)
    assert job.input_key not in swept and store.exists(job.input_key)
    assert sweep_orphaned_inputs(services_settings.model_copy(update={"orphaned_input_grace_s": 0}), database) == []


def test_the_local_store_lists_a_prefix_with_modification_times(tmp_path) -> None:
    from shared.core.settings import Settings

    store = make_object_store(Settings(home=tmp_path))
    store.put("inputs/2026/12/06/a", b"a")
    store.put("inputs/2026/12/07/b", b"b")
    store.put("models/x", b"x")
    listed = list(store.list_objects("inputs/2026/12/06/"))
    assert [item.key for item in listed] == ["inputs/2026/12/06/a"]
    assert listed[0].modified is not None and utcnow() - listed[0].modified < timedelta(minutes=1)
    assert [item.key for item in store.list_objects("nothing/here/")] == []
