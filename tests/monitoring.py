"""The monitoring files (infra/prometheus, infra/grafana) as the tests read them, and the Prometheus
binaries that check them (Debian's `prometheus` package: `prometheus` and `promtool`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "infra" / "prometheus"
GRAFANA_DIR = ROOT / "infra" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "xrayq.json"
# What Grafana puts in place of its range variable; any valid duration parses the same way.
RATE_INTERVAL = "1m"


def binary(name: str) -> str:
    """The path of a Prometheus binary; a machine without it fails the test (CI installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: apt-get install prometheus (Debian ships {name} in it)")
    return path


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every panel, Grafana's variables filled in."""
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", RATE_INTERVAL))
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]
