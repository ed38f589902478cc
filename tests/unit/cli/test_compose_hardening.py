"""The compose stack's defences, as the real docker-compose resolves the file (no Docker engine needed):
it refuses the development passwords unless told it is a trial, Redis requires a password every xrayq
service knows, xrayq containers are read-only and unprivileged, third-party images are pinned."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
OWN_PASSWORDS = "POSTGRES_PASSWORD=pg4hospital\nXRAYQ_S3_SECRET_KEY=s3forhospital\nREDIS_PASSWORD=redis4hospital\n"


def resolved(tmp_path: Path, dotenv: str) -> dict:
    """`docker compose config` with `.env` beside the file: what `docker compose up` would run."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose validates the compose file: apt-get install docker-compose (as .ci/run does)")
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text(dotenv)
    result = subprocess.run([binary, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def run_in_shell(service: dict, **extra: str) -> subprocess.CompletedProcess[str]:
    """A service's `sh -c` command run by a real shell with the environment compose gives it
    (`$$` is compose's escape for the container's own `$`)."""
    command = service["command"]
    assert command[:2] == ["sh", "-c"]
    environment = {name: str(value) for name, value in service["environment"].items()} | extra
    script = command[2].replace("$$", "$")
    return subprocess.run(["sh", "-c", script], env=environment, capture_output=True, text=True, timeout=30)


def test_the_stack_refuses_the_development_passwords(tmp_path: Path) -> None:
    services = resolved(tmp_path, "")  # a newcomer's `docker compose up` without a .env
    assert services["migrate"]["depends_on"]["credentials-check"] == {"condition": "service_completed_successfully"}
    refused = run_in_shell(services["credentials-check"])
    assert refused.returncode == 1
    assert "POSTGRES_PASSWORD XRAYQ_S3_SECRET_KEY REDIS_PASSWORD" in refused.stderr
    assert "XRAYQ_ALLOW_DEV_CREDENTIALS=true" in refused.stderr


def test_one_development_password_left_is_named(tmp_path: Path) -> None:
    services = resolved(tmp_path, "POSTGRES_PASSWORD=pg4hospital\nXRAYQ_S3_SECRET_KEY=s3forhospital\n")
    refused = run_in_shell(services["credentials-check"])
    assert refused.returncode == 1 and "development passwords of: REDIS_PASSWORD." in refused.stderr


@pytest.mark.parametrize("dotenv", [OWN_PASSWORDS, "XRAYQ_ALLOW_DEV_CREDENTIALS=true\n"])
def test_own_passwords_or_the_explicit_trial_opt_in_start(tmp_path: Path, dotenv: str) -> None:
    started = run_in_shell(resolved(tmp_path, dotenv)["credentials-check"])
    assert started.returncode == 0, started.stderr


def test_redis_requires_the_password_every_xrayq_service_uses(tmp_path: Path) -> None:
    services = resolved(tmp_path, OWN_PASSWORDS)
    redis = services["redis"]
    assert "--requirepass" in redis["command"][2] and redis["environment"]["REDIS_PASSWORD"] == "redis4hospital"
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]
    for name, service in services.items():
        if service.get("command", [""])[0] == "xrayq":
            assert service["environment"]["XRAYQ_BROKER_URL"] == "redis://:redis4hospital@redis:6379/0", name


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_redis_command_and_healthcheck_work_for_real(tmp_path: Path) -> None:
    """The compose file's own Redis command and healthcheck, run against a real redis-server."""
    redis = resolved(tmp_path, OWN_PASSWORDS)["redis"]
    environment = {"REDIS_PASSWORD": "redis4hospital", "PATH": "/usr/bin:/bin"}
    script = redis["command"][2].replace("$$", "$") + " --port 0 --unixsocket " + str(tmp_path / "r.sock")
    server = subprocess.Popen(["sh", "-c", script], env=environment, cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        check = (
            redis["healthcheck"]["test"][1].replace("$$", "$").replace("redis-cli", f"redis-cli -s {tmp_path}/r.sock")
        )
        wrong = check.replace('"${REDIS_PASSWORD}"', "wrong")
        deadline = time.monotonic() + 15
        while subprocess.run(["sh", "-c", check], env=environment, timeout=5).returncode != 0:
            assert time.monotonic() < deadline, "the healthcheck never passed"
            time.sleep(0.05)  # polling a server that is starting, with a deadline
        assert subprocess.run(["sh", "-c", wrong], env=environment, timeout=5).returncode != 0
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_xrayq_containers_are_read_only_and_unprivileged(tmp_path: Path) -> None:
    services = resolved(tmp_path, OWN_PASSWORDS)
    ours = {name: s for name, s in services.items() if s.get("image", "").startswith("xrayq:")}
    assert {"credentials-check", "migrate", "gateway", "dicom", "worker", "trainer", "flower"} <= set(ours)
    for name, service in ours.items():
        assert service["read_only"] is True, name
        assert {mount.split(":")[0] for mount in service["tmpfs"]} == {"/tmp", "/var/lib/xrayq"}, name
        assert service["cap_drop"] == ["ALL"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name


def test_third_party_images_are_pinned_by_version() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        image = service["image"]
        if image.startswith("xrayq:"):
            continue  # built from this checkout
        _, _, tag = image.rpartition(":")
        assert tag and tag != "latest" and any(c.isdigit() for c in tag), f"{name}: {image}"
