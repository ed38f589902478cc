"""`python -m loadtest.task_events_cost` (README, "Logs and traces") on the real Redis: a real worker
drains the messages with task events off and on, and the report holds both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_the_measurement_reports_both_modes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.task_events_cost", "--redis", REDIS_URL, "--messages", "60", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["messages"] == 60
    for events in ("off", "on"):
        assert report[events]["messages_per_s"] > 0 and report[events]["cpu_ms_per_message"] > 0
        assert len(report[events]["rounds"]) == 1
