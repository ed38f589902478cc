"""A real `xrayq gateway` process (uvicorn) against the real local services, for attacks that need a
real HTTP server: raw sockets, Host headers, client addresses."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.harness.processes import start_process, stop_process, wait_ready
from tests.conftest import free_port


@contextlib.contextmanager
def running_gateway(services_env: dict[str, str], log: Path, **settings: object) -> Iterator[str]:
    """The gateway on a free loopback port with `services_env` and XRAYQ_<NAME>=value for each setting;
    yields its URL."""
    port = free_port()
    env = {
        **services_env,
        "XRAYQ_HOST": "127.0.0.1",
        "XRAYQ_PORT": str(port),
        "XRAYQ_RECONCILE_INTERVAL_S": "0",  # nothing but the requests under test
        **{f"XRAYQ_{name.upper()}": str(value) for name, value in settings.items()},
    }
    process = start_process([sys.executable, "-m", "services.cli", "gateway"], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(url, 60, path="/healthz", process=process, interval=0.2):
            pytest.fail(f"gateway did not start:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        stop_process(process)
