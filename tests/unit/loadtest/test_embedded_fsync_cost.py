"""`python -m loadtest.embedded_fsync_cost` as the README runs it: both lines printed, synced and not."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_it_prints_the_cost_per_accepted_job_with_and_without_syncs(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.embedded_fsync_cost", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    line = re.compile(r"^(unsynced|synced) +median ([\d.]+) ms, p95 ([\d.]+) ms per accepted job$", re.M)
    lines = line.findall(result.stdout)
    assert [line[0] for line in lines] == ["unsynced", "synced"]
    assert list(tmp_path.iterdir()) == []  # its homes are removed
