"""Real processes for load and fault tests: free loopback ports, process groups started and stopped
as a whole, supervised children found by role, and waiting (with a deadline) until a service answers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`args` run from the repository root with `env` over this environment, output appended to `log`.

    The process leads a session of its own, so `stop_process` reaches everything it starts."""
    with log.open("ab") as output:  # the child writes to its own copy of the descriptor
        return subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to the process's whole group; whatever has not exited within 30 s is killed."""
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def child_pids(parent_pid: int, role: str) -> list[int]:
    """Pids of the direct children of `parent_pid` whose command line holds the word `role`
    (the supervised `xrayq gateway`, `xrayq worker` ... of an `xrayq up`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent pid is the 2nd field after the command name, which may itself hold spaces.
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent_pid and role.encode() in cmdline:
            found.append(int(entry.name))
    return found


def peak_rss_mb(roles: tuple[str, ...]) -> dict[str, float | None]:
    """Peak resident memory (VmHWM, MB) of the local `xrayq <role>` processes, the largest of each role;
    None for a role with no process on this machine."""
    peaks: dict[str, float | None] = dict.fromkeys(roles)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "status").read_text()
        except OSError:
            continue
        for role in peaks:
            if f"services.cli {role}" in cmdline or f"xrayq {role}" in cmdline:
                hwm = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
                if hwm:
                    mb = round(int(hwm.split()[1]) / 1024, 1)
                    peaks[role] = max(peaks[role] or 0.0, mb)
    return peaks


def wait_ready(
    url: str,
    timeout: float,
    path: str = "/readyz",
    process: subprocess.Popen[bytes] | None = None,
    interval: float = 0.5,
) -> bool:
    """Poll `url + path` until it answers 200; False when `timeout` passes or `process` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return True
        time.sleep(interval)
    return False


def wait_for_port(port: int, timeout: float) -> bool:
    """Poll until something accepts TCP connections on the loopback `port` (a server with no HTTP)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False
