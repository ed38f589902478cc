"""The result cache against real Postgres and S3: the same bytes from the same organisation, answered by
the same version, are answered from the stored result -- never another organisation's."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY

from shared.core.queue import make_celery
from shared.core.storage import make_object_store
from shared.db.models import Job, JobStatus
from shared.db.session import database_for
from shared.intake.upload import Upload
from shared.jobs.submissions import submit_images
from shared.jobs.views import get_job, job_view
from tests.integration.test_worker_inference import make_predictor


@pytest.fixture
def settings(services_settings, services_model):
    return services_settings.model_copy(update={"coalesce_singles": False, "result_cache": True})


@pytest.fixture
def image_bytes(chest_images) -> bytes:
    """Bytes no other test sent: a chest image with a trailer of its own (decoders ignore it)."""
    return chest_images["NORMAL"][7].read_bytes() + uuid.uuid4().bytes


def send(settings, data: bytes, organisation: str | None, explain: bool = False) -> str:
    with database_for(settings).session() as session:
        submitted = submit_images(
            session, make_object_store(settings), make_celery(settings), settings,
            [Upload("resent.jpeg", data, "image/jpeg")], model_ref="chest-xray", as_batch=False,
            organisation=organisation, explain=explain,
        )  # fmt: skip
        return submitted.jobs[0].id


def lookups(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("xrayq_result_cache_lookups_total", {"model": "chest-xray", "outcome": outcome}) or 0
    )


def answered(settings, job_id: str) -> Job:
    """The job's row, with its API view as `job.view`."""
    with database_for(settings).session() as session:
        job = get_job(session, job_id)
        job.view = job_view(job)
        session.expunge_all()
        return job


def test_a_resent_image_is_answered_from_the_stored_result(settings, image_bytes) -> None:
    predictor = make_predictor(settings)
    first = send(settings, image_bytes, "org-a")
    predictor.run([first])
    hits = lookups("hit")
    again = send(settings, image_bytes, "org-a")
    # Its stored input is gone: a cached answer needs neither the bytes nor the model.
    make_object_store(settings).delete(answered(settings, again).input_key)
    predictor.run([again])
    original, repeat = answered(settings, first), answered(settings, again)
    assert repeat.status == JobStatus.succeeded and repeat.cached_from == first
    assert (repeat.label, repeat.probabilities, repeat.confidence, repeat.warnings) == (
        original.label, original.probabilities, original.confidence, original.warnings,
    )  # fmt: skip
    assert repeat.model_version_id == original.model_version_id
    assert "inference_ms" not in repeat.timings  # no forward pass ran for it
    assert repeat.view.result.cached is True and original.view.result.cached is False
    assert lookups("hit") == hits + 1


def test_another_organisation_never_gets_a_cached_answer(settings, image_bytes) -> None:
    predictor = make_predictor(settings)
    predictor.run([send(settings, image_bytes, "org-a")])
    for organisation in ("org-b", None):  # another tenant, and the open mode's jobs
        misses = lookups("miss")
        job_id = send(settings, image_bytes, organisation)
        predictor.run([job_id])
        job = answered(settings, job_id)
        assert job.status == JobStatus.succeeded and job.cached_from is None and "inference_ms" in job.timings
        assert lookups("miss") == misses + 1


def test_a_job_that_asks_for_an_explanation_is_computed(settings, image_bytes) -> None:
    predictor = make_predictor(settings)
    predictor.run([send(settings, image_bytes, "org-a")])
    job_id = send(settings, image_bytes, "org-a", explain=True)
    predictor.run([job_id])
    job = answered(settings, job_id)
    assert job.cached_from is None and "inference_ms" in job.timings  # the heatmap needs the pixels


def test_a_repeat_points_at_the_job_that_ran_the_model(settings, image_bytes) -> None:
    predictor = make_predictor(settings)
    ids = []
    for _ in range(3):
        ids.append(send(settings, image_bytes, "org-c"))
        predictor.run([ids[-1]])
    assert [answered(settings, job_id).cached_from for job_id in ids] == [None, ids[0], ids[0]]


def test_with_the_cache_off_every_job_is_computed(settings, image_bytes) -> None:
    off = settings.model_copy(update={"result_cache": False})
    predictor = make_predictor(off)
    predictor.run([send(off, image_bytes, "org-a")])
    job_id = send(off, image_bytes, "org-a")
    predictor.run([job_id])
    assert answered(off, job_id).cached_from is None
