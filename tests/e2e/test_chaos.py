"""The small chaos run: real processes, killed and restarted under load; nothing lost, nothing doubled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_quick_chaos_run_loses_and_doubles_nothing(data_dir) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.chaos", "--quick", "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout)
    faults = " ".join(event["fault"] for event in report["faults"])
    for fault in ("kill -9 worker", "restart redis", "postgres", "kill -9 gateway"):
        assert fault in faults, report["faults"]
    assert report["lost"] == report["unfinished"] == report["duplicated"] == 0, report
    assert report["results_not_exactly_one"] == report["batches_whose_counts_do_not_add_up"] == 0, report
    assert report["accepted_jobs"] == report["jobs_in_database"] == 150 + 8 * 20
    assert report["ok"] and result.returncode == 0
