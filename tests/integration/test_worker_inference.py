"""The worker's prediction step against real Postgres and S3: batching, idempotency, isolation of bad inputs."""

from __future__ import annotations

import math
import uuid

import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import load as load_safetensors
from sqlalchemy import select, update

from services.worker.inference import ModelCache, Predictor
from shared.core.storage import make_object_store
from shared.db.models import Job, JobStatus, ModelVersion
from shared.db.session import database_for
from shared.imaging.preprocess import PreprocessSpec
from shared.intake.upload import Upload
from shared.jobs.views import get_job, job_view
from shared.models.artifacts import register_version
from shared.models.views import version_view
from tests.integration.conftest import submit as submit_jobs


def make_predictor(settings) -> Predictor:
    store = make_object_store(settings)
    return Predictor(settings, database_for(settings), store, ModelCache(store, torch.device("cpu")))


@pytest.fixture
def predictor(services_settings, services_model) -> Predictor:
    # Coalescing off: these tests count exactly the jobs of their own messages.
    return make_predictor(services_settings.model_copy(update={"coalesce_singles": False}))


def submit(settings, uploads: list[Upload], as_batch: bool = True, model_ref: str = "chest-xray") -> list[str]:
    """No worker consumes the messages: the tests run the predictor on them themselves."""
    return [job.id for job in submit_jobs(settings, uploads, as_batch=as_batch, model_ref=model_ref)]


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


def test_an_input_changed_in_storage_fails_alone_and_is_counted(
    predictor, services_settings, chest_images, caplog
) -> None:
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
        model_name = bad.model_name
        corrupted = good[:1500] + b"PATIENT-SECRET-BYTES"
        store.put(bad.input_key, corrupted)  # corrupted in storage after it was accepted
    labels = {"model": model_name, "code": "input_corrupted"}
    before = REGISTRY.get_sample_value("xrayq_job_failures_total", labels) or 0
    predictor.run(ids)
    with database_for(services_settings).session() as session:
        statuses = [get_job(session, job_id).status for job_id in ids]
        bad = get_job(session, ids[1])
    assert statuses == [JobStatus.succeeded, JobStatus.failed, JobStatus.succeeded]
    assert bad.error_code == "input_corrupted"
    assert REGISTRY.get_sample_value("xrayq_job_failures_total", labels) == before + 1
    assert "does not match its sha256" in caplog.text and "PATIENT-SECRET-BYTES" not in caplog.text


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


# --- confidence and uncertainty -------------------------------------------------------------------


def register_copy(settings, services_model, extra_card: dict | None) -> str:
    """The session's tiny model registered again under a name of its own, with these card sections
    (None: a card as versions had before calibration); its name."""
    store = make_object_store(settings)
    name = f"chest-copy-{uuid.uuid4().hex[:8]}"
    with database_for(settings).session() as session:
        row = session.scalars(
            select(ModelVersion).where(
                ModelVersion.name == services_model["name"], ModelVersion.version == services_model["version"]
            )
        ).one()
        register_version(
            session, store, name=name, scope=None, architecture=row.architecture, classes=list(row.classes),
            preprocessing=PreprocessSpec.from_dict(row.card["preprocessing"]),
            state_dict=load_safetensors(store.get(row.weights_key)), metrics={}, data={}, training={},
            activate="always", intended_use=row.card["intended_use"], extra_card=extra_card,
        )  # fmt: skip
    return name


def views(settings, ids: list[str]) -> list[dict]:
    with database_for(settings).session() as session:
        return [job_view(get_job(session, job_id)).model_dump(mode="json") for job_id in ids]


def chest_uploads(chest_images, count: int) -> list[Upload]:
    paths = chest_images["NORMAL"][30 : 30 + count] + chest_images["PNEUMONIA"][30 : 30 + count]
    assert len(paths) == 2 * count
    return [Upload(p.name, p.read_bytes(), "image/jpeg") for p in paths]


def test_results_carry_calibrated_confidence_and_uncertainty(
    predictor, services_settings, services_model, chest_images
) -> None:
    with database_for(services_settings).session() as session:
        card = version_card(session, services_model)
    threshold = card["uncertainty"]["threshold"]
    ids = submit(services_settings, chest_uploads(chest_images, 4))
    assert predictor.run(ids) == {"claimed": 8}
    for job in views(services_settings, ids):
        result = job["result"]
        assert job["status"] == "succeeded" and result["calibrated"] is True
        assert result["confidence"] == result["probabilities"][result["label"]] == max(result["probabilities"].values())
        assert 0 <= result["uncertainty"] <= 1
        assert result["uncertain"] == (result["uncertainty"] > threshold)
        assert ("uncertain" in [w["code"] for w in job["warnings"]]) == result["uncertain"]


def test_a_version_with_an_old_card_still_answers_uncalibrated_and_says_why(
    predictor, services_settings, services_model, chest_images
) -> None:
    name = register_copy(services_settings, services_model, extra_card=None)
    ids = submit(services_settings, chest_uploads(chest_images, 2), model_ref=name)
    assert predictor.run(ids) == {"claimed": 4}
    for job in views(services_settings, ids):
        result = job["result"]
        assert job["status"] == "succeeded" and result["model"]["name"] == name
        assert result["calibrated"] is False and result["confidence"] == max(result["probabilities"].values())
        assert result["uncertainty"] is None and result["uncertain"] is None
        assert "uncertain" not in [w["code"] for w in job["warnings"]]
    with database_for(services_settings).session() as session:
        row = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).one()
        view = version_view(row)
    assert view.calibration["calibrated"] is False and "no calibration" in view.calibration["reason"]
    assert view.uncertainty["flags"] is False and "no uncertainty threshold" in view.uncertainty["reason"]


def test_the_temperature_is_applied_and_every_result_past_the_threshold_is_flagged_and_counted(
    predictor, services_settings, services_model, chest_images
) -> None:
    """The same weights served with and without a temperature: softmax(logits / T) against softmax(logits);
    a threshold of 0 flags every answer that is not certain, and each flag is counted in /metrics."""
    plain = register_copy(services_settings, services_model, extra_card=None)
    flagging = register_copy(
        services_settings,
        services_model,
        extra_card={
            "calibration": {"method": "temperature", "temperature": 3.0, "fitted_on": "validation"},
            "uncertainty": {"measure": "predictive_entropy", "threshold": 0.0},
        },
    )
    uploads = chest_uploads(chest_images, 2)
    plain_ids = submit(services_settings, uploads, model_ref=plain)
    flagged_ids = submit(services_settings, uploads, model_ref=flagging)
    assert predictor.run(plain_ids) == predictor.run(flagged_ids) == {"claimed": 4}
    for before, after in zip(views(services_settings, plain_ids), views(services_settings, flagged_ids), strict=True):
        logits = torch.tensor([math.log(p) for p in before["result"]["probabilities"].values()])
        expected = torch.softmax(logits / 3.0, dim=0).tolist()
        assert list(after["result"]["probabilities"].values()) == pytest.approx(expected, abs=1e-5)
        assert after["result"]["label"] == before["result"]["label"]  # a temperature never changes the answer
        assert after["result"]["calibrated"] is True and after["result"]["uncertain"] is True
        (warning,) = [w for w in after["warnings"] if w["code"] == "uncertain"]
        assert "have a person read this image" in warning["detail"]
    counted = REGISTRY.get_sample_value("xrayq_result_flags_total", {"model": flagging, "code": "uncertain"})
    assert counted == len(flagged_ids)


def version_card(session, services_model) -> dict:
    row = session.scalars(
        select(ModelVersion).where(
            ModelVersion.name == services_model["name"], ModelVersion.version == services_model["version"]
        )
    ).one()
    return dict(row.card)
