"""Every `xrayq` command, run as a user runs it (`python -m services.cli ...`, a process of its own)
against a real stack; each test checks what the command prints and what it changed.

`up`, `gateway`, `worker`, `trainer` and `dicom` also start every e2e stack (conftest's `Stack`);
`train DATA` without --server trains the embedded stack's model (`embedded_training`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, inspect, select

from tests.conftest import free_port, services_env_on_a_new_database, settings_from_env
from tests.e2e.conftest import ROOT, api_cli, xrayq

pytestmark = pytest.mark.e2e
TINY = ["--architecture", "mobilenet_v3_small", "--image-size", "64", "--batch-size", "8", "--epochs", "1"]


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m services.cli ARGS` as a long-lived process, stopped (its whole group) afterwards."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_until(condition, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if value := condition():
                return value
        time.sleep(0.2)
    raise AssertionError(f"not {what} within {timeout}s" + (f":\n{log.read_text()[-3000:]}" if log else ""))


def fields(text: str) -> dict[str, str]:
    """A summary's `label: value` lines."""
    return {label.strip(): value.strip() for label, _, value in (line.partition(":") for line in text.splitlines())}


# --- services mode on an empty database: migrate, keys, a gateway, ensure-model ----------------------


@pytest.fixture(scope="module")
def empty_services_env(services_env, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The services mode with a Postgres database of its own, still without a single table."""
    with services_env_on_a_new_database(services_env, tmp_path_factory.mktemp("cli-home"), "cli") as env:
        yield env


def test_migrate_creates_the_schema_and_is_idempotent(empty_services_env) -> None:
    engine = create_engine(empty_services_env["XRAYQ_DATABASE_URL"])
    try:
        assert inspect(engine).get_table_names() == []
        for _ in range(2):
            assert xrayq("migrate", env=empty_services_env).stdout.strip() == "database is at the latest schema"
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"alembic_version", "api_keys", "jobs", "batches", "model_versions", "training_runs"} <= tables


def test_keys_create_list_revoke_against_a_real_gateway(empty_services_env, tmp_path) -> None:
    env = {**empty_services_env, "XRAYQ_AUTH_CACHE_S": "0.5"}
    created = xrayq("keys", "create", "pacs", "--organisation", "st-mary", "--roles", "submit", env=env)
    header, token = created.stdout.strip().splitlines()
    key_id = header.split()[2]
    assert header == f"created key {key_id} (pacs, st-mary, roles submit):" and token.startswith("xq_")
    assert "only its hash is kept" in created.stderr

    listing = xrayq("keys", "list", env=env).stdout
    prefix, secret = token[: len("xq_") + 8], token[len("xq_") + 9 :]  # xq_<8 hex>_<secret>
    assert secret not in listing
    row = next(line.split() for line in listing.splitlines() if line.startswith(key_id))
    assert row == [key_id, f"{prefix}…", "st-mary", "submit", "pacs", "active"]
    as_json = {key["id"]: key for key in json.loads(xrayq("keys", "list", "--json", env=env).stdout)}
    assert as_json[key_id]["revoked_at"] is None and "key" not in as_json[key_id]
    admin = json.loads(
        xrayq("keys", "create", "ops", "--org", "st-mary", "--roles", "admin,train", "--json", env=env).stdout
    )
    assert admin["roles"] == ["admin", "train"] and admin["key"].startswith(admin["key_prefix"])

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "gateway.log"
    with running(["gateway"], {**env, "XRAYQ_PORT": str(port)}, log):
        wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 60, "serving", log)
        as_pacs = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{url}/v1/models", headers=as_pacs).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer xq_unknown"}).status_code == 401
        # An API refusal reaches the user as its code and detail, on stderr, with exit status 1.
        refused = xrayq("models", "promote", "chest-xray@1", "--server", url, "--api-key", token, expect=1)
        assert "403 forbidden:" in refused.stderr and refused.stdout == ""
        # XRAYQ_SERVER and XRAYQ_API_KEY stand for --server and --api-key.
        listed = xrayq("models", "list", "--json", env={"XRAYQ_SERVER": url, "XRAYQ_API_KEY": admin["key"]})
        assert json.loads(listed.stdout) == []

        assert xrayq("keys", "revoke", key_id, env=env).stdout.strip() == f"revoked {key_id} (pacs)"
        wait_until(
            lambda: httpx.get(f"{url}/v1/models", headers=as_pacs).status_code == 401, 10, "refused after revoke"
        )
    assert f"revoked {time.strftime('%Y-%m-%d', time.gmtime())}" in xrayq("keys", "list", env=env).stdout
    unknown = xrayq("keys", "revoke", str(uuid.uuid4()), env=env, expect=1)
    assert unknown.stderr.startswith("api_key_not_found:")
    bad_role = xrayq("keys", "create", "x", "--org", "y", "--roles", "root", env=env, expect=1)
    assert bad_role.stderr.startswith("invalid_parameter:")


def test_ensure_model_says_why_it_cannot_and_leaves_an_active_model_alone(
    empty_services_env, e2e_services_env, tmp_path
) -> None:
    no_data = xrayq("ensure-model", env={**empty_services_env, "XRAYQ_DATA_DIR": str(tmp_path)}, expect=1)
    assert "no starter data at" in no_data.stdout
    other = xrayq("ensure-model", env={**empty_services_env, "XRAYQ_DEFAULT_MODEL": "other"}, expect=1)
    assert "No active version of 'other'" in other.stdout

    from shared.db.models import ModelVersion
    from shared.db.session import database_for

    database = database_for(settings_from_env(e2e_services_env))
    with database.session() as session:
        before = session.scalar(select(func.count()).select_from(ModelVersion))
    assert before and xrayq("ensure-model", env=e2e_services_env).stdout == ""
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == before


def test_worker_runs_with_the_concurrency_asked_for(e2e_services_env, tmp_path) -> None:
    log = tmp_path / "worker.log"
    env = {**e2e_services_env, "XRAYQ_WORKER_METRICS_PORT": "0"}
    with running(["worker", "--concurrency", "1"], env, log) as worker:
        wait_until(lambda: " ready." in log.read_text(), 90, "ready", log)
        pool = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
        assert len(pool) == 1, log.read_text()[-2000:]
    assert "concurrency: 1 (prefork)" in log.read_text()


# --- a local training, and the running stacks --------------------------------------------------------


def test_train_without_server_registers_a_version_and_reports_each_epoch(embedded_training) -> None:
    _, result = embedded_training
    assert result.stdout.startswith("chest-xray@1 registered and active: validation accuracy ")
    lines = result.stderr.splitlines()
    assert any(line.startswith("data: ") and "train /" in line for line in lines), result.stderr
    assert any(line.startswith("epoch 1/1: train loss ") for line in lines), result.stderr
    assert "\r" not in result.stderr  # no bar redrawn into a pipe


def test_up_runs_each_service_as_its_own_command(stack) -> None:
    for role in ("gateway", "worker", "trainer", "dicom"):
        pid = stack.child_pid(role)
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:4] == [b"-m", b"services.cli", role.encode()]


def test_datasets_upload_list_show(stack, chest_images, tmp_path) -> None:
    folder = tmp_path / "cli-data"
    for label, paths in chest_images.items():
        (folder / label).mkdir(parents=True)
        for path in paths[:12]:
            shutil.copy(path, folder / label / path.name)
    name = f"cli-{stack.mode}"
    uploaded = fields(api_cli(stack, "datasets", "upload", str(folder), "--name", name).stdout)
    dataset_id = uploaded["id"]
    assert uploaded["dataset"] == f"{name}@1" and uploaded["classes"] == "NORMAL, PNEUMONIA"
    assert stack.http.get(f"/v1/datasets/{dataset_id}").json()["files"] == 24

    extended = json.loads(api_cli(stack, "datasets", "upload", str(folder), "--extends", name, "--json").stdout)
    assert extended["name"] == name and extended["version"] == 2 and extended["parent_id"] == dataset_id

    table = api_cli(stack, "datasets", "list").stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "VERSION", "CLASSES", "FILES", "CREATED"]
    assert [dataset_id, name, "1", "NORMAL,PNEUMONIA", "24"] in [line.split()[:5] for line in table]
    assert dataset_id in {d["id"] for d in json.loads(api_cli(stack, "datasets", "list", "--json").stdout)}
    assert fields(api_cli(stack, "datasets", "show", name).stdout)["dataset"] == f"{name}@2"
    assert json.loads(api_cli(stack, "datasets", "show", f"{name}@1", "--json").stdout)["id"] == dataset_id
    missing = api_cli(stack, "datasets", "show", "no-such-dataset", expect=1)
    assert "404 dataset_not_found:" in missing.stderr


def test_train_with_server_runs_watch_show_list(stack) -> None:
    name = f"cli-{stack.mode}"
    queued = api_cli(stack, "train", f"{name}@1", "--name", name, "--promotion", "always", *TINY, "--no-wait", "--json")
    run_id = json.loads(queued.stdout)["id"]
    assert f"training run {run_id} queued" in queued.stderr

    watched = api_cli(stack, "runs", "watch", run_id, timeout=240)
    assert fields(watched.stdout)["run"] == run_id and fields(watched.stdout)["model"] == f"{name}@1"
    assert "epoch 1: train loss" in watched.stderr
    shown = json.loads(api_cli(stack, "runs", "show", run_id, "--json").stdout)
    assert shown["status"] == "succeeded" and shown["model"] == {"name": name, "version": 1}
    summary = fields(api_cli(stack, "runs", "show", run_id).stdout)
    assert summary["status"] == "succeeded"
    # The figures of the version the run produced, as the API's run view carries them.
    assert summary["accuracy"] == f"{shown['evaluation']['accuracy']:.4f}"
    assert summary["ROC-AUC"] == f"{shown['evaluation']['roc_auc']:.4f}"
    table = api_cli(stack, "runs", "list").stdout.splitlines()
    assert [run_id, "succeeded", f"{name}@1"] in [line.split()[:3] for line in table]
    assert run_id in {run["id"] for run in json.loads(api_cli(stack, "runs", "list", "--json").stdout)}

    # The one-command path: train and follow; a second, manual version stays inactive.
    second = fields(api_cli(stack, "train", name, "--name", name, *TINY, timeout=240).stdout)
    assert second["status"] == "succeeded" and second["model"] == f"{name}@2"
    assert stack.http.get(f"/v1/models/{name}/versions/2").json()["is_active"] is False


def test_models_list_show_promote_rollback(stack, chest_images, tmp_path) -> None:
    name = f"cli-{stack.mode}"  # trained by the test above: v1 active, v2 not
    table = api_cli(stack, "models", "list").stdout.splitlines()
    assert table[0].split() == [
        "MODEL",
        "OWNER",
        "VERSION",
        "ACTIVE",
        "ARCHITECTURE",
        "CLASSES",
        "ACCURACY",
        "ROC-AUC",
        "CREATED",
    ]
    rows = sorted(line.split()[:5] for line in table if line.startswith(f"{name} "))
    assert rows == [
        [name, "shared", "1", "*", "mobilenet_v3_small"],  # trained with the admin key: a shared model
        [name, "shared", "2", "mobilenet_v3_small", "NORMAL,PNEUMONIA"],
    ]
    listed = {m["name"]: m for m in json.loads(api_cli(stack, "models", "list", "--json").stdout)}
    assert listed[name]["active_version"] == 1 and listed["chest-xray"]["classes"] == ["NORMAL", "PNEUMONIA"]

    card = fields(api_cli(stack, "models", "show", f"{name}@2").stdout)
    assert card["model"] == f"{name}@2" and card["active"] == "no"
    assert stack.http.get(card["plot confusion_matrix"]).content.startswith(b"\x89PNG")
    assert json.loads(api_cli(stack, "models", "show", f"{name}@2", "--json").stdout)["evaluation"]["summary"]["n"]
    assert json.loads(api_cli(stack, "models", "show", name, "--json").stdout)["active_version"] == 1
    assert len(api_cli(stack, "models", "show", name).stdout.splitlines()) == 3  # header and two versions

    assert api_cli(stack, "models", "promote", f"{name}@2").stdout.strip() == f"{name}@2 is now active"
    assert stack.http.get(f"/v1/models/{name}/versions/2").json()["is_active"] is True
    assert api_cli(stack, "models", "rollback", name).stdout.strip() == f"{name}@1 is now active"
    assert stack.http.get(f"/v1/models/{name}/versions/1").json()["is_active"] is True

    holdout = tmp_path / "holdout"  # a dataset with a test split: the images if_better runs are judged on
    for split, chosen in (("train", slice(0, 3)), ("test", slice(3, 6))):
        for label, paths in chest_images.items():
            (holdout / split / label).mkdir(parents=True)
            for path in paths[chosen]:
                shutil.copy(path, holdout / split / label / path.name)
    dataset_id = json.loads(api_cli(stack, "datasets", "upload", str(holdout), "--json").stdout)["id"]
    said = api_cli(stack, "models", "evaluation-set", name, dataset_id).stdout.strip()
    assert said.startswith(f"{name}: if_better runs are judged on ") and said.endswith(f"of dataset {dataset_id}")
    chosen = json.loads(api_cli(stack, "models", "evaluation-set", name, dataset_id, "--json").stdout)
    listed = {m["name"]: m for m in stack.http.get("/v1/models").json()}
    assert listed[name]["evaluation_set"]["dataset_id"] == chosen["dataset_id"] == dataset_id

    no_version = api_cli(stack, "models", "promote", name, expect=1)
    assert no_version.stderr.startswith("invalid_parameter: Give the version as name@version")
    assert "404 model_not_found:" in api_cli(stack, "models", "show", f"{name}@9", expect=1).stderr


def test_models_import(stack, tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from shared.models.nets import build_model

    torch.manual_seed(5)
    state = build_model("mobilenet_v3_small", 2).state_dict()
    weights = tmp_path / "site-b.safetensors"
    save_file(state, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    name = f"imported-{stack.mode}"
    fit = ["--architecture", "mobilenet_v3_small", "--classes", "NORMAL,PNEUMONIA"]

    shown = fields(api_cli(stack, "models", "import", name, str(weights), *fit).stdout)
    assert shown["model"] == f"{name}@1" and shown["active"] == "no"
    assert shown["architecture"] == "mobilenet_v3_small" and shown["imported from"] == "site-b.safetensors"
    card = stack.http.get(f"/v1/models/{name}/versions/1").json()["card"]
    assert card["source"] == "import" and card["import"]["sha256"] == digest  # the CLI sent the file's own
    again = api_cli(
        stack, "models", "import", name, str(weights), *fit, "--sha256", digest, "--image-size", "96", "--json"
    )
    version = json.loads(again.stdout)
    assert version["version"] == 2 and version["preprocessing"]["size"] == 96 and version["is_active"] is False

    wrong = api_cli(stack, "models", "import", name, str(weights), *fit, "--sha256", "0" * 64, expect=1)
    assert "-> 422 weights_sha256_mismatch:" in wrong.stderr
    pickled = tmp_path / "model.pt"
    torch.save(state, pickled)
    assert "-> 415 weights_pickled:" in api_cli(stack, "models", "import", name, str(pickled), *fit, expect=1).stderr
    assert "is not a file" in api_cli(stack, "models", "import", name, str(tmp_path / "nothing"), *fit, expect=1).stderr
    listed = {model["name"]: model for model in stack.http.get("/v1/models").json()}
    assert [v["version"] for v in listed[name]["versions"]] == [2, 1]  # the refused imports registered nothing


def test_runs_cancel(stack) -> None:
    name = f"cli-{stack.mode}"
    queued = api_cli(stack, "train", f"{name}@1", "--name", name, *TINY[:-1], "500", "--no-wait", "--json")
    run_id = json.loads(queued.stdout)["id"]
    cancelled = fields(api_cli(stack, "runs", "cancel", run_id).stdout)
    assert cancelled["run"] == run_id and cancelled["status"] in (
        "cancelled (cancel requested)",
        "running (cancel requested)",
    )
    wait_until(
        lambda: json.loads(api_cli(stack, "runs", "show", run_id, "--json").stdout)["status"] == "cancelled",
        60,
        "cancelled",
    )
    again = api_cli(stack, "runs", "cancel", run_id, expect=1)
    assert "run_not_cancellable:" in again.stderr
