"""`xrayq up` as a supervisor: its children never outlive it, even when it is killed with -9."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e


def test_children_stop_when_the_supervisor_is_killed(embedded_env, tmp_path) -> None:
    stack = Stack(embedded_env, tmp_path / "up.log")
    stack.start()
    try:
        children = [stack.child_pid(role) for role in ("gateway", "worker", "trainer")]
        assert stack.process is not None
        os.kill(stack.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in children):
            time.sleep(0.2)
        alive = [
            pid
            for pid in children
            if Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
        ]
        assert not alive, f"orphans still running: {alive}"
    finally:
        stack.stop()
