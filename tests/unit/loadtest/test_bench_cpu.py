"""`make bench` reads each stack process's CPU time from the kernel's counters, by role."""

from __future__ import annotations

import subprocess
import sys
import time

from loadtest.harness.cpu import cpu_seconds_by_role, role_of, stack_processes

BURN_THEN_WAIT = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\ntime.sleep(30)"


def test_roles_are_read_from_command_lines_as_the_stack_starts_them() -> None:
    assert role_of([b"/app/.venv/bin/python", b"/app/.venv/bin/xrayq", b"worker", b""]) == "worker"
    assert role_of([b"python", b"-m", b"services.cli", b"gateway", b"--port", b"8000"]) == "gateway"
    assert role_of([b"/usr/bin/redis-server 127.0.0.1:6379", b""]) == "redis"
    assert role_of([b"postgres: 15/main: postgres xrayq 127.0.0.1(5000) idle"]) == "postgres"
    assert role_of([b"python", b"-m", b"pytest", b"tests/unit"]) is None
    assert role_of([b"xrayq", b"keys", b"create"]) is None  # a one-off command is not part of the stack


def test_the_cpu_a_process_spends_is_counted_to_its_role() -> None:
    process = subprocess.Popen([sys.executable, "-c", BURN_THEN_WAIT, "xrayq", "trainer"])
    try:
        deadline = time.monotonic() + 30
        while (seen := stack_processes().get(process.pid, ("trainer", 0.0)))[1] < 0.38:
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        role, cpu_s = stack_processes()[process.pid]
        assert role == "trainer" and cpu_s < 1.0  # it burnt 0.4 s, then slept
        assert cpu_seconds_by_role()["trainer"] >= cpu_s  # and it is part of its role's total
    finally:
        process.kill()
        process.wait()
