"""`xrayq backup` and `xrayq restore` as the README runs them (the command line, a process of its own),
against real Postgres and the S3 server, and in the embedded mode: a restore into a fresh database and
bucket answers every read of the API as the original did, and its model still answers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from botocore.exceptions import ClientError
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.worker.inference import ModelCache, Predictor
from shared.core.storage import LocalObjectStore, ObjectStore, make_object_store
from shared.db.migrate import head_revision, upgrade_database
from shared.db.session import database_for
from shared.intake.upload import Upload
from tests.conftest import ADMIN_HEADERS, png_bytes, scratch_database, settings_from_env
from tests.integration.conftest import submit

ROOT = Path(__file__).resolve().parents[2]


def xrayq(*args: str, env: dict[str, str], expect: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == expect, f"exit {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def contents(store: ObjectStore) -> dict[str, str]:
    """Every object of a store: key -> sha256 of its bytes."""
    return {item.key: hashlib.sha256(store.get(item.key)).hexdigest() for item in store.list_objects()}


def answer_jobs(settings, uploads: list[Upload]) -> list[str]:
    """Jobs submitted and answered by the worker's own predictor, in this process: their ids."""
    ids = [job.id for job in submit(settings, uploads, as_batch=True)]
    store = make_object_store(settings)
    # Coalescing off: the predictor takes exactly these jobs, not other tests' waiting singles.
    own = settings.model_copy(update={"coalesce_singles": False})
    predictor = Predictor(own, database_for(own), store, ModelCache(store, torch.device("cpu")))
    assert predictor.run(ids) == {"claimed": len(ids)}
    return ids


def api_reads(client: TestClient, job_ids: list[str]) -> dict[str, object]:
    """What a client can read of jobs, batches, datasets, training runs and models."""
    jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids]
    batch_id = jobs[0]["batch_id"]
    return {
        "jobs": jobs,
        "batch": client.get(f"/v1/batches/{batch_id}").json(),
        "datasets": client.get("/v1/datasets").json(),
        "runs": client.get("/v1/training-runs").json(),
        "models": client.get("/v1/models").json(),
        "version": client.get("/v1/models/chest-xray/versions/1").json(),
    }


@pytest.fixture(scope="module")
def source(services_env, services_settings, services_model, chest_images):
    """The session's deployment (its trained model brought a dataset, a run and a version) with answered
    jobs in a batch: backed up whole, whatever other tests left in it."""
    paths = chest_images["NORMAL"][:2] + chest_images["PNEUMONIA"][:2]
    job_ids = answer_jobs(services_settings, [Upload(p.name, p.read_bytes(), "image/jpeg") for p in paths])
    return services_env, services_settings, job_ids


def test_a_restore_into_a_fresh_database_and_bucket_answers_as_the_original(source, tmp_path, chest_images) -> None:
    env, settings, job_ids = source
    with TestClient(create_app(settings), headers=ADMIN_HEADERS) as client:
        before = api_reads(client, job_ids)
    assert [job["status"] for job in before["jobs"]] == ["succeeded"] * 4  # type: ignore[index]
    assert before["datasets"] and before["runs"]

    backup = tmp_path / "backup"
    printed = json.loads(xrayq("backup", str(backup), "--json", env=env).stdout)
    original = contents(make_object_store(settings))
    assert printed["objects"] == len(original) > 0 and printed["alembic_revision"] == head_revision()
    manifest = json.loads((backup / "manifest.json").read_text())
    assert {entry["key"]: entry["sha256"] for entry in manifest["objects"]} == original

    with scratch_database() as fresh_url:
        target_env = {**env, "XRAYQ_DATABASE_URL": fresh_url, "XRAYQ_S3_BUCKET": "xrayq-backup-restored"}
        target = settings_from_env(target_env)
        upgrade_database(target)  # as `xrayq migrate` (compose's migrate job) leaves it: a schema, no rows
        assert "intact" in xrayq("restore", str(backup), "--dry-run", env=target_env).stdout
        xrayq("restore", str(backup), env=target_env)

        assert contents(make_object_store(target)) == original
        with TestClient(create_app(target), headers=ADMIN_HEADERS) as client:
            assert api_reads(client, job_ids) == before
            weights = client.get("/v1/models/chest-xray/versions/1/weights")
            assert hashlib.sha256(weights.content).hexdigest() == before["version"]["weights_sha256"]  # type: ignore[index]
        # The model still answers, in the restored deployment, with the restored version.
        new_job = answer_jobs(target, [Upload("new.jpeg", chest_images["PNEUMONIA"][3].read_bytes(), "image/jpeg")])
        with TestClient(create_app(target), headers=ADMIN_HEADERS) as client:
            answered = client.get(f"/v1/jobs/{new_job[0]}").json()
        assert answered["status"] == "succeeded" and answered["result"]["model"]["version"] == 1

        # A target that holds data is refused, and left as it was.
        refused = xrayq("restore", str(backup), env=target_env, expect=1)
        assert "backup_target_not_empty" in refused.stderr


def test_a_tampered_backup_is_refused_before_anything_is_written(source, tmp_path) -> None:
    env, settings, _ = source
    backup = tmp_path / "backup.tar"
    xrayq("backup", str(backup), env=env)
    # One byte of one object changed inside the tar (the manifest, read first, still says the old sha256).
    manifest = json.loads(_tar_member(backup, "manifest.json"))
    victim = max(manifest["objects"], key=lambda entry: entry["size"])
    data = bytearray(backup.read_bytes())
    offset = data.find(_tar_member(backup, victim["file"]))
    data[offset + 100] ^= 0xFF
    backup.write_bytes(bytes(data))

    with scratch_database() as fresh_url:
        target_env = {**env, "XRAYQ_DATABASE_URL": fresh_url, "XRAYQ_S3_BUCKET": "xrayq-backup-tampered"}
        refused = xrayq("restore", str(backup), env=target_env, expect=1)
        assert "backup_corrupt" in refused.stderr and victim["file"] in refused.stderr
        bucket = make_object_store(settings_from_env(target_env))
        with pytest.raises(ClientError, match="404|NoSuchBucket"):  # not even created
            bucket.ping()
        from shared.backup.database import holds_rows

        assert not holds_rows(fresh_url)


def _tar_member(path: Path, name: str) -> bytes:
    import tarfile

    with tarfile.open(path) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()


def chest_zip(chest_images, per_class: int = 6) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for label, paths in chest_images.items():
            for path in paths[:per_class]:
                archive.writestr(f"{label}/{path.name}", path.read_bytes())
    return buffer.getvalue()


OPEN_MODE_URL = "http://127.0.0.1:8000"  # the embedded gateway answers its loopback address only


def embedded_env(home: Path) -> dict[str, str]:
    # Embedded mode: no service URL at all (those of the services tests are not inherited).
    return {"XRAYQ_HOME": str(home), "XRAYQ_DATABASE_URL": "", "XRAYQ_BROKER_URL": "", "XRAYQ_S3_ENDPOINT_URL": ""}


def test_the_embedded_mode_backs_up_to_a_tar_and_restores_into_a_new_home(tmp_path, chest_images) -> None:
    env = embedded_env(tmp_path / "home")
    settings = settings_from_env(env)
    assert settings.embedded
    upgrade_database(settings)
    with TestClient(create_app(settings), base_url=OPEN_MODE_URL) as client:
        created = client.post("/v1/datasets", files={"file": ("d.zip", chest_zip(chest_images), "application/zip")})
        assert created.status_code == 201, created.text
        dataset = created.json()

    xrayq("backup", str(tmp_path / "embedded.tar"), env=env)
    restored_env = embedded_env(tmp_path / "restored")
    xrayq("restore", str(tmp_path / "embedded.tar"), env=restored_env)

    restored = settings_from_env(restored_env)
    assert contents(LocalObjectStore(restored.storage_dir)) == contents(LocalObjectStore(settings.storage_dir))
    with TestClient(create_app(restored), base_url=OPEN_MODE_URL) as client:
        assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset

    # Over a home that holds data only with --force: the database is replaced, not merged.
    with TestClient(create_app(restored), base_url=OPEN_MODE_URL) as client:
        later = client.post("/v1/datasets", files={"file": ("e.zip", chest_zip(chest_images, 3), "application/zip")})
        assert later.status_code == 201, later.text
    xrayq("restore", str(tmp_path / "embedded.tar"), "--force", env=restored_env)
    with TestClient(create_app(restored), base_url=OPEN_MODE_URL) as client:
        assert [row["id"] for row in client.get("/v1/datasets").json()] == [dataset["id"]]


def test_an_older_backup_is_migrated_forward_and_a_newer_one_refused(tmp_path) -> None:
    old = settings_from_env(embedded_env(tmp_path / "old"))
    previous = "0010"
    upgrade_database(old, previous)
    old.storage_dir.mkdir(parents=True)  # type: ignore[union-attr]
    LocalObjectStore(old.storage_dir).put("inputs/x/y.png", png_bytes(np.zeros((32, 32), np.uint8)))  # type: ignore[arg-type]
    xrayq("backup", str(tmp_path / "old-backup"), env=embedded_env(tmp_path / "old"))

    printed = xrayq("restore", str(tmp_path / "old-backup"), env=embedded_env(tmp_path / "new"))
    assert f"schema migrated from {previous} to {head_revision()}" in printed.stdout
    from shared.backup.database import current_revision

    assert current_revision(settings_from_env(embedded_env(tmp_path / "new")).database_url) == head_revision()

    # A backup from a newer xrayq (a revision this code does not know) is refused, nothing restored.
    manifest_path = tmp_path / "old-backup" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["database"]["alembic_revision"] = "9999"
    manifest_path.write_text(json.dumps(manifest))
    refused = xrayq("restore", str(tmp_path / "old-backup"), env=embedded_env(tmp_path / "newer"), expect=1)
    assert "backup_newer_than_code" in refused.stderr
    assert not (tmp_path / "newer" / "xrayq.db").exists()
