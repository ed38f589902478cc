"""The compose `flower` service (profile `monitoring`): task events on in every xrayq service, Flower
published on the host's loopback only, and refused without the password it needs off loopback."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from services.cli.main import app
from shared.core.settings import get_settings
from tests.unit.cli.test_compose import COMPOSE, service_environment


def test_every_xrayq_service_sends_task_events_and_none_traces_by_default() -> None:
    for service in ("gateway", "worker", "trainer", "flower"):
        variables = service_environment(service, {})
        assert variables["XRAYQ_TASK_EVENTS"] == "on" and variables["XRAYQ_OTEL_ENDPOINT"] == ""


def test_flower_is_published_on_the_loopback_only() -> None:
    flower = yaml.safe_load(COMPOSE.read_text())["services"]["flower"]
    assert flower["profiles"] == ["monitoring"] and flower["command"] == ["xrayq", "flower"]
    assert [port.split(":")[0] for port in flower["ports"]] == ["127.0.0.1"]


def test_the_compose_flower_refuses_to_start_without_a_password(monkeypatch, tmp_path: Path) -> None:
    for name, value in {**service_environment("flower", {}), "XRAYQ_HOME": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["flower"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2 and "XRAYQ_FLOWER_BASIC_AUTH=user:password" in result.output
