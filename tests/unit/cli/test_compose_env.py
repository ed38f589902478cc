"""docker-compose.yml and .env.example against the one Settings: every XRAYQ_* setting is documented
and reaches every xrayq service; the stack starts in order, healthy, and publishes nothing but its APIs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.core.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_ONLY_HEADING = "# == Compose only"
# Settings whose value the compose file's layout decides (container paths and ports, the bundled Postgres).
FIXED_BY_COMPOSE = {
    "XRAYQ_HOME",
    "XRAYQ_DATA_DIR",
    "XRAYQ_DATABASE_URL",
    "XRAYQ_BROKER_URL",  # carries REDIS_PASSWORD
    "XRAYQ_HOST",
    "XRAYQ_PORT",
    "XRAYQ_DICOM_PORT",
}
# What the host may reach: the HTTP API, the DICOM receiver, and Prometheus in its opt-in profile.
PUBLISHED = {"gateway", "dicom", "prometheus", "grafana", "flower"}  # flower on the host's loopback only
_DOCUMENTED = re.compile(r"^# (?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def setting_names() -> set[str]:
    """The settings an operator sets: every field read from its XRAYQ_ variable (not, e.g., the
    PROMETHEUS_MULTIPROC_DIR that `xrayq gateway` sets for its own processes)."""
    return {f"XRAYQ_{name.upper()}" for name, field in Settings.model_fields.items() if field.validation_alias is None}


def documented() -> tuple[dict[str, str], dict[str, str]]:
    """The variables .env.example documents, as {name: value shown}: xrayq's settings, compose's own."""
    settings: dict[str, str] = {}
    compose_only: dict[str, str] = {}
    section = settings
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith(COMPOSE_ONLY_HEADING):
            section = compose_only
        if match := _DOCUMENTED.match(line):
            assert match["name"] not in {**settings, **compose_only}, f"{match['name']} documented twice"
            section[match["name"]] = match["value"]
    return settings, compose_only


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # anchors and merge keys (<<) resolved by the loader


def xrayq_services() -> dict[str, dict]:
    return {name: s for name, s in compose()["services"].items() if s.get("command", [""])[0] == "xrayq"}


def compose_default(value: str) -> str | None:
    """What compose passes when the variable is unset: `${NAME:-default}` -> default; a fixed value as is."""
    match = re.fullmatch(r"\$\{\w+:-(?P<default>[^}]*)\}", value)
    return match["default"] if match else value


def test_every_setting_is_documented_once_in_env_example() -> None:
    settings, compose_only = documented()
    assert setting_names() - set(settings) == set(), "settings missing from .env.example"
    assert set(settings) - setting_names() == set(), ".env.example documents settings that do not exist"
    assert not setting_names() & set(compose_only)


def test_env_example_shows_the_default_each_service_gets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The value beside each commented setting is the program's default, or the one compose passes."""
    environment = compose()["x-xrayq-env"]
    for name in setting_names():  # the program's defaults, not the test run's environment (tests/conftest.py)
        monkeypatch.delenv(name, raising=False)
    program_default = Settings()
    for name, shown in documented()[0].items():
        monkeypatch.setenv(name, shown)
        field = name.removeprefix("XRAYQ_").lower()
        value = getattr(Settings(), field)
        monkeypatch.delenv(name)
        in_compose = compose_default(str(environment[name]))
        assert value == getattr(program_default, field) or shown == in_compose, f"{name}={shown} is neither default"


def test_every_setting_reaches_every_xrayq_service_from_env() -> None:
    environment = compose()["x-xrayq-env"]
    assert set(environment) == setting_names(), "x-xrayq-env must list exactly the settings"
    for name, value in environment.items():
        if name not in FIXED_BY_COMPOSE:
            assert str(value).startswith(f"${{{name}:-"), f"{name} must come from .env: ${{{name}:-...}}"
    services = xrayq_services()
    assert {"migrate", "starter-model", "gateway", "dicom", "worker", "trainer", "worker-gpu"} <= set(services)
    for name, service in services.items():
        assert setting_names() <= set(service["environment"]), f"{name} lacks settings"


def test_compose_variables_are_documented_and_used() -> None:
    settings, compose_only = documented()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", COMPOSE.read_text()))  # `$${X}` is the container's own
    assert used <= set(settings) | set(compose_only), "compose reads variables .env.example does not document"
    assert set(compose_only) <= used, ".env.example documents compose variables compose does not read"


def test_every_long_running_service_is_healthchecked_and_waited_for() -> None:
    services = compose()["services"]
    one_shots = {name for name, s in services.items() if s.get("restart") == "no"}
    assert one_shots == {"credentials-check", "migrate", "starter-model"}
    for name, service in services.items():
        if name not in one_shots:
            assert "healthcheck" in service, f"{name} has no healthcheck"
        for needed, condition in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if needed in one_shots else "service_healthy"
            assert condition == {"condition": expected}, f"{name} -> {needed}"
    for role in ("gateway", "dicom", "worker", "trainer"):
        assert services[role]["healthcheck"]["test"] == ["CMD", "xrayq", "healthcheck", role]
    assert services["worker-gpu"]["healthcheck"]["test"] == ["CMD", "xrayq", "healthcheck", "worker"]


def test_only_the_apis_are_published_and_state_lives_in_named_volumes() -> None:
    document = compose()
    assert {name for name, s in document["services"].items() if s.get("ports")} == PUBLISHED
    assert "createbuckets" not in document["services"]  # `xrayq migrate` creates the bucket
    named = set(document["volumes"])
    for role, volume in (("postgres", "pgdata"), ("redis", "redisdata"), ("minio", "miniodata")):
        (mount,) = document["services"][role]["volumes"]
        assert mount.split(":")[0] == volume and volume in named


def test_docker_compose_resolves_an_env_file_into_every_xrayq_service(tmp_path: Path) -> None:
    """The real docker-compose reads `.env` beside the file, as `cp .env.example .env` makes it."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose validates the compose file: apt-get install docker-compose (as .ci/run does)")
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text(
        ENV_EXAMPLE.read_text()
        + "XRAYQ_CORS_ORIGINS=https://ris.example.org\nXRAYQ_WORKER_CONCURRENCY=3\nPOSTGRES_PASSWORD=s3cret\n"
    )
    result = subprocess.run([binary, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(xrayq_services()) <= set(services)
    for name in xrayq_services():
        environment = services[name]["environment"]
        assert environment["XRAYQ_CORS_ORIGINS"] == "https://ris.example.org", name
        assert str(environment["XRAYQ_WORKER_CONCURRENCY"]) == "3", name
        assert environment["XRAYQ_DATABASE_URL"] == "postgresql+psycopg2://xrayq:s3cret@postgres:5432/xrayq"
        assert environment["XRAYQ_ADMIN_KEY"] == ""  # commented in .env.example: migrate makes the key
