"""schemathesis against a real gateway, authenticated as two organisations: no server error, and
nothing one organisation made (by the fuzzer or on purpose) can be read by the other.

The CLI, as in tests/e2e/test_stack.py (its pytest plugin lags behind pytest 9), once per
organisation's key, against a gateway with a database, Redis prefix and bucket of its own (the fuzzer
may promote, roll back and train: none of that may touch the models other tests use).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from shared.db.models import Batch, Dataset, Job, TrainingRun
from shared.db.session import database_for
from tests.conftest import ADMIN_HEADERS, services_env_of_its_own, settings_from_env
from tests.integration.test_training_runs import TINY_RUN, chest_zip
from tests.security.gateway_process import running_gateway

pytestmark = pytest.mark.e2e

ORGANISATIONS = ("hospital-north", "hospital-south")
# What each kind of row is read at, by id.
READ_PATHS = {
    Job: "/v1/jobs/{}",
    Batch: "/v1/batches/{}",
    Dataset: "/v1/datasets/{}",
    TrainingRun: "/v1/training-runs/{}",
}
LIST_PATHS = ("/v1/jobs", "/v1/batches", "/v1/datasets", "/v1/training-runs")


@pytest.fixture(scope="module")
def fuzz_env(services_env, tmp_path_factory, data_dir):
    with services_env_of_its_own(services_env, tmp_path_factory.mktemp("fuzz-home"), "fuzz", data_dir) as env:
        yield env


@pytest.fixture(scope="module")
def gateway(fuzz_env, tmp_path_factory) -> str:
    with running_gateway(fuzz_env, tmp_path_factory.mktemp("fuzz") / "gateway.log") as url:
        yield url


@pytest.fixture(scope="module")
def organisation_keys(gateway) -> dict[str, str]:
    keys = {}
    for organisation in ORGANISATIONS:
        body = {"name": f"{organisation}-all", "organisation": organisation, "roles": ["submit", "train"]}
        response = httpx.post(f"{gateway}/v1/api-keys", json=body, headers=ADMIN_HEADERS, timeout=30)
        assert response.status_code == 201, response.text
        keys[organisation] = response.json()["key"]
    return keys


def fuzz(url: str, key: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{url}/openapi.json",
            "--header",
            f"Authorization: Bearer {key}",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "6",
            # The coverage phase trips a CPython 3.11 ast bug inside hypothesis (a SystemError in the tool).
            "--phases",
            "examples,fuzzing,stateful",
            "--seed",
            "12",
            "--workers",
            "2",
            "--request-timeout",
            "70",  # long-polls may ask for the longest wait
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=workdir,
    )


def seed(http: httpx.Client, chest_images, tag: str) -> None:
    """One of everything an organisation owns, made on purpose (the fuzzer rarely makes valid images)."""
    image = chest_images["NORMAL"][30]
    assert http.post("/v1/jobs", files={"file": (image.name, image.read_bytes())}).status_code == 202
    files = [("files", (path.name, path.read_bytes())) for path in chest_images["PNEUMONIA"][30:32]]
    assert http.post("/v1/batches", files=files).status_code == 202
    dataset = http.post(
        "/v1/datasets",
        files={"file": ("data.zip", chest_zip(chest_images, per_class=6), "application/zip")},
        data={"name": f"fuzz-{tag}"},
    )
    assert dataset.status_code == 201, dataset.text
    run = http.post("/v1/training-runs", json={**TINY_RUN, "dataset": dataset.json()["id"]})
    assert run.status_code == 202, run.text


def test_fuzzing_as_two_organisations_finds_no_server_error_and_no_cross_organisation_read(
    gateway, organisation_keys, fuzz_env, chest_images, tmp_path
) -> None:
    clients = {
        organisation: httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        for organisation, key in organisation_keys.items()
    }
    for organisation, key in organisation_keys.items():
        result = fuzz(gateway, key, tmp_path)
        assert result.returncode == 0, f"{organisation}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
        seed(clients[organisation], chest_images, organisation)

    owned = rows_by_organisation(fuzz_env)
    for owner, reader in (ORGANISATIONS, ORGANISATIONS[::-1]):
        mine = owned[owner]
        assert {table for table, _ in mine} == set(READ_PATHS), mine  # something of every kind to steal
        http = clients[reader]
        for table, row_id in mine:
            stolen = http.get(READ_PATHS[table].format(row_id))
            assert stolen.status_code == 404, (reader, table.__name__, row_id, stolen.text)
        listed = {item["id"] for path in LIST_PATHS for item in http.get(path).json()}
        assert not listed & {row_id for _, row_id in mine}, (reader, "lists rows of", owner)
    for client in clients.values():
        client.close()


def rows_by_organisation(env: dict[str, str]) -> dict[str, list[tuple[type, str]]]:
    owned: dict[str, list[tuple[type, str]]] = {organisation: [] for organisation in ORGANISATIONS}
    with database_for(settings_from_env(env)).session() as session:
        for table in READ_PATHS:
            for row_id, organisation in session.execute(select(table.id, table.organisation)):
                if organisation in owned:
                    owned[organisation].append((table, row_id))
    return owned
