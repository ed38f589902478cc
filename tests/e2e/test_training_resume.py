"""A training run survives its trainer: real `xrayq trainer` processes on real Postgres, Redis and the
S3 server. One is killed (SIGKILL) after a checkpoint and the reconciler (run here as each gateway runs
it) queues the run again: the next trainer continues after the last epoch. One is stopped (SIGTERM, as a
redeploy stops it) and hands the run back by itself: the next trainer continues it, no reconciler needed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from loadtest.harness.images import CHEST_TRAIN
from loadtest.harness.processes import start_process, stop_process
from services.trainer.local_datasets import dataset_from_path
from shared.core.queue import make_celery
from shared.core.storage import S3ObjectStore, make_object_store
from shared.db.models import TrainingRun
from shared.db.session import database_for
from shared.schemas import TrainingRunCreate
from shared.training.checkpoints import checkpoint_key
from shared.training.reconciler import reconcile_runs
from shared.training.runs import create_run, publish_run
from tests.conftest import scratch_database, settings_from_env

pytestmark = pytest.mark.e2e
EPOCHS = 5
RUN = {"architecture": "mobilenet_v3_small", "image_size": 48, "batch_size": 4, "promotion": "manual"}


@pytest.fixture(scope="module")
def env(services_env, tmp_path_factory) -> dict[str, str]:
    """A database, Redis key prefix and bucket of their own: these trainers take only these runs."""
    with scratch_database() as database_url:
        env = {
            **services_env,
            "XRAYQ_HOME": str(tmp_path_factory.mktemp("resume-home")),
            "XRAYQ_DATABASE_URL": database_url,
            "XRAYQ_BROKER_KEY_PREFIX": services_env["XRAYQ_BROKER_KEY_PREFIX"] + "resume:",
            "XRAYQ_S3_BUCKET": "xrayq-resume",
            "XRAYQ_RUN_HEARTBEAT_S": "0.3",
            # A killed trainer's run is presumed lost after 30 s without a heartbeat (2 minutes by default;
            # much less would take runs from live trainers that a loaded machine stalls for seconds).
            "XRAYQ_RUN_STALE_AFTER_S": "30",
            # One thread: on a busy machine more only fight over the cores.
            "XRAYQ_TORCH_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        settings = settings_from_env(env)
        from shared.db.migrate import upgrade_database

        upgrade_database(settings)
        S3ObjectStore(settings).ensure_bucket()
        yield env


@pytest.fixture(scope="module")
def dataset_id(env, data_dir) -> str:
    settings = settings_from_env(env)
    with database_for(settings).session() as session:
        dataset = dataset_from_path(
            session, make_object_store(settings), settings, data_dir / CHEST_TRAIN, name="resume", max_per_class=12
        )
        return dataset.id


def queue_run(env: dict[str, str], dataset_id: str) -> str:
    """A run queued as the gateway queues one: the row, then the message."""
    settings = settings_from_env(env)
    request = TrainingRunCreate(dataset=dataset_id, model_name="resume-e2e", epochs=EPOCHS, **RUN)
    with database_for(settings).session() as session:
        run_id = create_run(session, settings, request, None, model_scope=None).id
    assert publish_run(make_celery(settings), run_id)
    return run_id


def start_trainer(env: dict[str, str], log: Path):
    return start_process([sys.executable, "-m", "services.cli", "trainer"], env, log)


def run_row(env: dict[str, str], run_id: str) -> TrainingRun:
    with database_for(settings_from_env(env)).session() as session:
        row = session.get(TrainingRun, run_id)
        assert row is not None
        session.expunge(row)
        return row


def wait_for(env, run_id, predicate, what: str, timeout: float = 120, each=None) -> TrainingRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if each is not None:
            each()
        row = run_row(env, run_id)
        if predicate(row):
            return row
        assert row.status.value not in ("failed", "cancelled"), (row.status, row.error_code, row.error_detail)
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s (run: {row.status}, {row.progress})")


def test_a_killed_trainers_run_resumes_on_the_next_trainer_from_its_last_epoch(env, dataset_id, tmp_path) -> None:
    run_id = queue_run(env, dataset_id)
    first = start_trainer(env, tmp_path / "trainer-1.log")
    second = None
    try:
        wait_for(env, run_id, lambda r: (r.checkpoint_epoch or 0) >= 1, "first checkpoint")
        os.killpg(first.pid, signal.SIGKILL)  # the trainer and its pool process, no goodbye
        first.wait(10)
        killed = run_row(env, run_id)
        assert killed.status.value == "running" and killed.checkpoint_epoch is not None
        assert killed.checkpoint_epoch < EPOCHS, "training ended before the kill: more epochs or data"
        assert make_object_store(settings_from_env(env)).exists(checkpoint_key(run_id))

        second = start_trainer(env, tmp_path / "trainer-2.log")
        settings = settings_from_env(env)
        database, celery = database_for(settings), make_celery(settings)
        done = wait_for(
            env, run_id, lambda r: r.status.value == "succeeded", "resumed run succeeded", timeout=180,
            each=lambda: reconcile_runs(settings, database, celery),
        )  # fmt: skip
    finally:
        stop_process(second)
        stop_process(first, signal.SIGKILL)
    assert done.resumes == 1 and done.handbacks == 0 and done.error_code is None
    assert [h["epoch"] for h in done.history] == list(range(1, EPOCHS + 1))
    assert done.started_at == killed.started_at  # one run, started once
    assert f"resumes after epoch {killed.checkpoint_epoch}" in (tmp_path / "trainer-2.log").read_text()
    assert not make_object_store(settings).exists(checkpoint_key(run_id))


def test_a_trainer_stopped_by_sigterm_hands_its_run_back_and_the_next_one_finishes_it(
    env, dataset_id, tmp_path
) -> None:
    run_id = queue_run(env, dataset_id)
    first = start_trainer(env, tmp_path / "trainer-1.log")
    second = None
    try:
        wait_for(env, run_id, lambda r: (r.checkpoint_epoch or 0) >= 1, "first checkpoint")
        first.send_signal(signal.SIGTERM)  # to the main process only, as Docker, Kubernetes and `xrayq up` do
        assert first.wait(60) == 0  # a warm shutdown that did not wait for the whole run
        handed = run_row(env, run_id)
        assert handed.status.value == "queued" and handed.handbacks == 1 and handed.resumes == 0, handed.progress
        assert handed.checkpoint_epoch is not None and handed.checkpoint_epoch < EPOCHS

        second = start_trainer(env, tmp_path / "trainer-2.log")  # no reconciler: the trainer published it back
        done = wait_for(env, run_id, lambda r: r.status.value == "succeeded", "handed-back run succeeded", 180)
    finally:
        stop_process(second)
        stop_process(first, signal.SIGKILL)
    assert done.handbacks == 1 and done.resumes == 0
    assert [h["epoch"] for h in done.history] == list(range(1, EPOCHS + 1))
    assert f"resumes after epoch {handed.checkpoint_epoch}" in (tmp_path / "trainer-2.log").read_text()
