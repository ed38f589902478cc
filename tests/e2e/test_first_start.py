"""The compose quick start without Docker: the same commands the containers run (`xrayq migrate`,
`gateway`, `worker`, `healthcheck ...`) as real processes against real Postgres, Redis and S3 on a new
database, and the README's own shell lines (reading the key from migrate's log, curl) run against them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.harness.processes import start_process, stop_process
from services.cli.main import BOOTSTRAP_KEY_BANNER
from tests.conftest import CHEST_TRAIN, free_port, services_env_on_a_new_database, settings_from_env, train_tiny_model
from tests.e2e.conftest import ROOT, xrayq
from tests.security.gateway_process import running_gateway

pytestmark = pytest.mark.e2e
README = ROOT / "README.md"


def compose_section() -> str:
    text = README.read_text()
    start = text.index("## Running with docker compose")
    return text[start : text.index("\n## ", start + 1)]


def shell_lines(section: str) -> list[str]:
    """The commands of the section's ```bash blocks, continuation lines joined, comments dropped."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def bash(command: str, env: dict[str, str]) -> str:
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def healthcheck(role: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "healthcheck", role],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.3)
    raise AssertionError(f"not {what} within {timeout}s")


@pytest.fixture(scope="module")
def new_installation(services_env, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The services mode on an empty database and bucket of its own, with no XRAYQ_ADMIN_KEY set:
    what `docker compose up` meets the first time."""
    home = tmp_path_factory.mktemp("first-start-home")
    with services_env_on_a_new_database(services_env, home, "first-start") as env:
        yield {
            **env,
            "XRAYQ_ADMIN_KEY": "",  # as `.env.example` leaves it
            "XRAYQ_LIVENESS_INTERVAL_S": "0.5",
            "XRAYQ_WORKER_METRICS_PORT": "0",
        }


@pytest.fixture(scope="module")
def migrate_log(new_installation, tmp_path_factory) -> Path:
    """What `docker compose logs --no-log-prefix migrate` shows after two `up`s: two runs of migrate."""
    log = tmp_path_factory.mktemp("migrate") / "migrate.log"
    log.write_text("".join(xrayq("migrate", env=new_installation).stdout for _ in range(2)))
    return log


@pytest.fixture(scope="module")
def admin_key(migrate_log) -> str:
    (line,) = [line for line in migrate_log.read_text().splitlines() if line.startswith(BOOTSTRAP_KEY_BANNER)]
    return line.removeprefix(f"{BOOTSTRAP_KEY_BANNER}: ")


@pytest.fixture(scope="module")
def gateway(new_installation, migrate_log, tmp_path_factory) -> Iterator[str]:
    with running_gateway(new_installation, tmp_path_factory.mktemp("gateway") / "gateway.log") as url:
        yield url


@contextlib.contextmanager
def worker(env: dict[str, str], log: Path) -> Iterator[None]:
    process = start_process([sys.executable, "-m", "services.cli", "worker", "--concurrency", "1"], env, log)
    try:
        yield
    finally:
        stop_process(process)


def test_migrate_prints_an_admin_key_once_and_keeps_only_its_hash(migrate_log, admin_key, new_installation) -> None:
    output = migrate_log.read_text()
    assert output.count(BOOTSTRAP_KEY_BANNER) == 1 and output.count(admin_key) == 1
    assert output.count("database is at the latest schema") == 2
    (key,) = json.loads(xrayq("keys", "list", "--json", env=new_installation).stdout)
    assert (key["name"], key["organisation"], key["roles"]) == ("bootstrap-admin", "admin", ["admin"])
    assert admin_key.startswith(key["key_prefix"]) and "key" not in key


def test_a_short_admin_key_stops_the_first_start_saying_what_to_set(new_installation) -> None:
    short = {**new_installation, "XRAYQ_ADMIN_KEY": "changeme"}
    for command in ("migrate", "gateway", "worker"):
        refused = xrayq(command, env=short, expect=2, timeout=60)
        assert "XRAYQ_ADMIN_KEY is 8 characters long: set it to at least 32" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_the_gateway_is_healthy_once_a_model_is_active(gateway, admin_key, new_installation, data_dir) -> None:
    env = {**new_installation, "XRAYQ_PORT": gateway.rsplit(":", 1)[1]}
    unready = healthcheck("gateway", env)
    assert unready.returncode == 1 and "model: no active version" in unready.stderr
    as_admin = {"Authorization": f"Bearer {admin_key}"}
    assert httpx.get(f"{gateway}/v1/models", headers=as_admin).json() == []
    assert httpx.get(f"{gateway}/v1/models").status_code == 401
    train_tiny_model(settings_from_env(new_installation), data_dir)
    ready = healthcheck("gateway", env)
    assert ready.returncode == 0 and ready.stdout.strip() == "gateway: ready"
    stopped = healthcheck("gateway", {**env, "XRAYQ_PORT": str(free_port())})
    assert stopped.returncode == 1 and "does not answer" in stopped.stderr


def test_the_readmes_quick_start_lines_run_as_written(
    gateway, admin_key, migrate_log, new_installation, data_dir, tmp_path
) -> None:
    """Reading the key from migrate's log, sending an image with curl, reading its result."""
    lines = shell_lines(compose_section())
    (read_key,) = [line for line in lines if line.startswith("export XRAYQ_API_KEY=")]
    shell = {**os.environ, **new_installation}
    read_key = read_key.replace("docker compose logs --no-log-prefix migrate", f"cat {migrate_log}")
    assert bash(f'{read_key}; printf %s "$XRAYQ_API_KEY"', shell) == admin_key

    submit, result = [line for line in lines if line.startswith("curl")]
    shell["XRAYQ_API_KEY"] = admin_key
    host = {"http://localhost:8000": gateway, "../shared/data": str(data_dir)}
    for written, here in host.items():
        submit, result = submit.replace(written, here), result.replace(written, here)
    assert (data_dir / CHEST_TRAIN).is_dir()

    if healthcheck("gateway", {**new_installation, "XRAYQ_PORT": gateway.rsplit(":", 1)[1]}).returncode != 0:
        train_tiny_model(settings_from_env(new_installation), data_dir)  # this test run alone
    log = tmp_path / "worker.log"
    with worker(new_installation, log):
        wait_for(lambda: healthcheck("worker", new_installation).returncode == 0, 120, "worker healthy")
        job = json.loads(bash(submit, shell))
        assert job["status"] == "queued"
        answer = json.loads(bash(result.replace("9b1c…", job["id"]), shell))
        assert answer["status"] == "succeeded", answer
        assert answer["result"]["label"] in ("NORMAL", "PNEUMONIA")
    stopped = healthcheck("worker", new_installation)  # a stopped worker removes its heartbeat
    assert stopped.returncode == 1 and "has not started (or has stopped)" in stopped.stderr
