"""CPU time of the stack's processes, by role, from the kernel's own counters (/proc/<pid>/stat).

The benchmark compares these before and after a measurement: CPU seconds are what a process spent,
whoever else shares the machine, so "CPU per image" and "CPU of an idle stack" can be compared across
runs and machines where images per second cannot. A process that exits during the window takes its
time with it; the stack's processes live for the whole run.
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
XRAYQ_ROLES = ("gateway", "worker", "trainer", "dicom", "up")
# Local services of services mode; absent (0) when they run elsewhere or the stack is embedded.
SERVICE_ROLES = {"redis": b"redis-server", "postgres": b"postgres"}


def role_of(cmdline: list[bytes]) -> str | None:
    """`xrayq <role>` / `python -m services.cli <role>` (and the pool children forked from one), or a
    local Redis/Postgres server process."""
    words = [part for part in cmdline if part]
    for word, following in zip(words, words[1:], strict=False):
        role = following.decode(errors="replace")
        if (word.endswith(b"xrayq") or word == b"services.cli") and role in XRAYQ_ROLES:
            return role
    if words:
        # Postgres rewrites its backends' command lines ("postgres: 15/main: ..."): the first word counts.
        program = os.path.basename(words[0].split(b" ")[0])
        for role, name in SERVICE_ROLES.items():
            if program.startswith(name):
                return role
    return None


def stack_processes(session: int | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (role, user + system CPU seconds so far) of every stack process on this machine, or only
    of those in the process session `session` (a stack started with `start_process` leads one)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            # utime and stime are fields 14 and 15; the command name before them may hold spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        role = role_of(cmdline)
        if role is not None and (session is None or int(fields[3]) == session):
            found[int(entry.name)] = (role, (int(fields[11]) + int(fields[12])) / TICKS_PER_S)
    return found


def cpu_seconds_by_role(session: int | None = None) -> dict[str, float]:
    """User + system CPU seconds so far of every process of each role (of `session`, if given)."""
    totals = dict.fromkeys([*XRAYQ_ROLES, *SERVICE_ROLES], 0.0)
    for role, cpu_s in stack_processes(session).values():
        totals[role] += cpu_s
    return totals


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: max(after.get(role, 0.0) - spent, 0.0) for role, spent in before.items()}
