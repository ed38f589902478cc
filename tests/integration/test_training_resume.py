"""A training run outlives its trainer: checkpointed each epoch to S3, queued again by the reconciler
when its trainer is lost (until the resume budget is spent), handed back by a stopping trainer, and
continued from the last epoch. Real gateway app, Postgres, Redis and the S3 server; runs executed
in-process by the trainer's own `execute_run` (tests/e2e kill real trainer processes)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from services.gateway.app import create_app
from services.trainer import handback
from services.trainer.runs import execute_run
from shared.core.queue import make_celery
from shared.core.settings import Settings
from shared.core.storage import make_object_store
from shared.db.models import TrainingRun, utcnow
from shared.db.session import database_for
from shared.training.checkpoints import checkpoint_key
from shared.training.reconciler import reconcile_runs
from shared.training.runs import RunNotHeld, claim_run, record_progress
from tests.conftest import ADMIN_HEADERS
from tests.integration.test_training_runs import chest_zip, upload

RUN = {"architecture": "mobilenet_v3_small", "image_size": 64, "epochs": 3, "batch_size": 16, "promotion": "manual"}


class TrainerKilled(BaseException):
    """The process dying mid-epoch: nothing of the trainer's own handling runs (not an Exception)."""


@pytest.fixture(scope="module")
def settings(services_settings):
    # No reconciler in the app: the tests run it themselves, at the moment they choose.
    return services_settings.model_copy(update={"reconcile_interval_s": 0.0, "run_heartbeat_s": 0.0})


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings), headers=ADMIN_HEADERS) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def dataset(client, chest_images) -> dict:
    response = upload(client, chest_zip(chest_images, per_class=10), name="chest-resume")
    assert response.status_code == 201, response.text
    return response.json()


def start_run(client, dataset) -> str:
    response = client.post("/v1/training-runs", json={"dataset": dataset["id"], **RUN})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def stop_in_epoch(epoch: int, how):
    """A listener that calls `how` at the first step of `epoch` (after the checkpoint of the one before)."""

    def listener(event: dict) -> None:
        if event["event"] == "step" and event["epoch"] == epoch:
            how()

    return listener


def kill() -> None:
    raise TrainerKilled


def lose_heartbeat(settings, run_id: str) -> None:
    with database_for(settings).session() as session:
        session.execute(
            update(TrainingRun).where(TrainingRun.id == run_id).values(heartbeat_at=utcnow() - timedelta(hours=1))
        )


def test_a_lost_trainers_run_is_queued_again_and_continues_from_its_last_epoch(client, dataset, settings) -> None:
    run_id = start_run(client, dataset)
    store = make_object_store(settings)
    with pytest.raises(TrainerKilled):
        execute_run(settings, run_id, listener=stop_in_epoch(2, kill))
    died = client.get(f"/v1/training-runs/{run_id}").json()
    assert died["status"] == "running" and died["checkpoint_epoch"] == 1 and died["resumes"] == 0
    assert store.exists(checkpoint_key(run_id))
    first_epoch = died["history"]

    lose_heartbeat(settings, run_id)
    outcome = reconcile_runs(settings, database_for(settings), make_celery(settings))
    assert outcome["resumed"] == 1 and outcome["failed"] == 0
    queued = client.get(f"/v1/training-runs/{run_id}").json()
    assert queued["status"] == "queued" and queued["resumes"] == 1 and queued["checkpoint_epoch"] == 1

    events: list[dict] = []
    shown: list[dict] = []

    def watch(event: dict) -> None:
        events.append(event)
        shown.append(client.get(f"/v1/training-runs/{run_id}").json()["progress"])

    assert execute_run(settings, run_id, listener=watch) is not None
    training = [e for e in events if e["event"] in ("step", "epoch")]
    assert training[0]["epoch"] == 2  # epoch 1 was not trained again
    assert sorted({e["epoch"] for e in training}) == [2, 3]
    # The progress shown goes on from the checkpoint: never back to 0 %, never before epoch 2.
    percents = [p["percent"] for p in shown if p.get("phase") in ("loading", "training")]
    assert percents and min(percents) >= 33.3
    assert all(p.get("epoch") in (None, 2, 3) for p in shown)
    done = client.get(f"/v1/training-runs/{run_id}").json()
    assert done["status"] == "succeeded" and done["model"] is not None
    assert [h["epoch"] for h in done["history"]] == [1, 2, 3] and done["history"][0] == first_epoch[0]
    assert done["resumes"] == 1 and done["checkpoint_epoch"] == 3
    assert not store.exists(checkpoint_key(run_id))  # deleted when the run ended


def test_a_run_lost_once_more_than_the_budget_allows_fails_trainer_lost(client, dataset, settings, monkeypatch) -> None:
    # The budget as an operator sets it: XRAYQ_RUN_MAX_RESUMES (default 3).
    assert settings.run_max_resumes == 3
    monkeypatch.setenv("XRAYQ_RUN_MAX_RESUMES", "1")
    settings = Settings(**settings.model_dump(exclude={"run_max_resumes"}))
    assert settings.run_max_resumes == 1
    run_id = start_run(client, dataset)
    store = make_object_store(settings)
    store.put(checkpoint_key(run_id), b"a checkpoint")
    with database_for(settings).session() as session:
        assert claim_run(session, run_id, "a-trainer-that-dies")
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id)
            .values(resumes=settings.run_max_resumes, checkpoint_epoch=1, heartbeat_at=utcnow() - timedelta(hours=1))
        )
    outcome = reconcile_runs(settings, database_for(settings), make_celery(settings))
    assert outcome["failed"] == 1 and outcome["resumed"] == 0
    body = client.get(f"/v1/training-runs/{run_id}").json()
    assert body["status"] == "failed" and body["error"]["code"] == "trainer_lost"
    assert f"resumed {settings.run_max_resumes} times" in body["error"]["detail"]
    assert not store.exists(checkpoint_key(run_id))


def test_a_trainer_presumed_lost_cannot_write_to_the_run_it_lost(client, dataset, settings) -> None:
    run_id = start_run(client, dataset)
    with database_for(settings).session() as session:
        assert claim_run(session, run_id, "slow-trainer")
    lose_heartbeat(settings, run_id)
    reconcile_runs(settings, database_for(settings), make_celery(settings))
    with database_for(settings).session() as session:
        assert claim_run(session, run_id, "next-trainer")
    with pytest.raises(RunNotHeld), database_for(settings).session() as session:
        record_progress(session, run_id, {"phase": "training", "percent": 99.0}, trainer="slow-trainer")
    body = client.get(f"/v1/training-runs/{run_id}").json()
    assert body["status"] == "running" and body["progress"]["phase"] == "loading"  # the next trainer's


def test_a_stopping_trainer_hands_its_run_back_without_spending_the_budget(client, dataset, settings) -> None:
    run_id = start_run(client, dataset)
    store = make_object_store(settings)
    published: list[str] = []
    try:
        execute_run(settings, run_id, listener=stop_in_epoch(2, handback._stop.set), requeue=published.append)
    finally:
        handback._stop.clear()
    assert published == [run_id]
    body = client.get(f"/v1/training-runs/{run_id}").json()
    assert body["status"] == "queued" and body["handbacks"] == 1 and body["resumes"] == 0
    assert body["checkpoint_epoch"] == 1 and store.exists(checkpoint_key(run_id))

    # Cancelled while queued: no trainer will hold it again, the cancellation deletes its checkpoint.
    assert client.post(f"/v1/training-runs/{run_id}/cancel").json()["status"] == "cancelled"
    assert not store.exists(checkpoint_key(run_id))
