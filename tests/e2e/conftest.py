"""Real processes: `xrayq up` (gateway, worker, trainer as children) in embedded and in services mode."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loadtest.harness.processes import child_pids, start_process, wait_ready
from tests.conftest import (
    ADMIN_HEADERS,
    ADMIN_KEY,
    CHEST_TRAIN,
    TINY_TRAIN_ARGS,
    free_port,
    services_env_of_its_own,
)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def xrayq(
    *args: str, env: dict[str, str] | None = None, expect: int = 0, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The real command line in a process of its own, as a user runs it; asserts its exit status."""
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == expect, f"exit {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def api_cli(stack: Stack, *args: str, expect: int = 0, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """An `xrayq` command that talks to `stack`'s gateway, as its admin."""
    return xrayq(*args, "--server", stack.url, "--api-key", ADMIN_KEY, expect=expect, timeout=timeout)


class Stack:
    """One `xrayq up` process tree, started the way the README says."""

    def __init__(self, env: dict[str, str], log_path: Path, sr_destination: str = "") -> None:
        self.port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Every process's metrics endpoint on a port of its own: never the defaults another stack may hold.
        self.metrics_ports = {role: free_port() for role in ("worker", "trainer", "dicom")}
        self.worker_metrics_url = f"http://127.0.0.1:{self.metrics_ports['worker']}/metrics"
        self.env = {
            **os.environ,
            **env,
            "XRAYQ_PORT": str(self.port),
            # Never the well-known 11112: another stack (or PACS tool) on this machine may hold it.
            "XRAYQ_DICOM_PORT": str(self.dicom_port),
            # Senders are known by AE title and source address (services mode refuses to start without both).
            "XRAYQ_DICOM_ALLOWED_AE_TITLES": f"{SCU_AE_TITLE}@127.0.0.1,{OTHER_SCU_AE_TITLE}@127.0.0.1:radiology-2",
            "XRAYQ_DICOM_SR_DESTINATION": sr_destination,
            # Short stability timeout and quick checks: study batches close within seconds.
            "XRAYQ_STUDY_STABLE_AFTER_S": "2",
            "XRAYQ_STUDY_CHECK_INTERVAL_S": "0.3",
            "XRAYQ_DELIVERY_RETRY_AFTER_S": "0.5",
            # The tests' callback receivers listen on loopback, which callbacks may reach only when allowed.
            "XRAYQ_CALLBACK_ALLOW_NETWORKS": "127.0.0.0/8",
            "XRAYQ_WORKER_METRICS_PORT": str(self.metrics_ports["worker"]),
            "XRAYQ_TRAINER_METRICS_PORT": str(self.metrics_ports["trainer"]),
            "XRAYQ_DICOM_METRICS_PORT": str(self.metrics_ports["dicom"]),
            "PYTHONUNBUFFERED": "1",
            # Quick reconciler: a message lost with a killed worker is republished within seconds.
            "XRAYQ_RECONCILE_INTERVAL_S": "1",
            "XRAYQ_REQUEUE_AFTER_S": "5",
            # Training runs report progress often enough to be watched moving in a short test.
            "XRAYQ_RUN_HEARTBEAT_S": "0.3",
            # ...and a killed trainer's run is failed within seconds, not minutes.
            "XRAYQ_RUN_STALE_AFTER_S": "15",
        }
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        # The admin key: required in services mode, ignored by the open embedded mode.
        self.http = httpx.Client(base_url=self.url, headers=ADMIN_HEADERS, timeout=60)

    def start(self, timeout: float = 120) -> None:
        # Its own process group (session): nothing outlives the test.
        self.process = start_process(
            [sys.executable, "-m", "services.cli", "up", "--no-starter"], self.env, self.log_path
        )
        if not wait_ready(self.url, timeout, process=self.process, interval=0.3):
            if self.process.poll() is not None:
                pytest.fail(f"xrayq up exited early:\n{self.log_path.read_text()[-3000:]}")
            pytest.fail(f"stack not ready within {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def child_pid(self, role: str) -> int:
        """The pid of the supervised `xrayq <role>` child."""
        assert self.process is not None
        pids = child_pids(self.process.pid, role)
        if not pids:
            raise LookupError(role)
        return pids[0]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(40)
        if self.process:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # stragglers of the whole tree
        self.http.close()


@pytest.fixture(scope="session")
def embedded_training(tmp_path_factory, data_dir) -> tuple[dict[str, str], subprocess.CompletedProcess[str]]:
    """The newcomer's path: the real CLI trains a (tiny, quick) model into an empty embedded store."""
    home = tmp_path_factory.mktemp("embedded-home")
    env = {"XRAYQ_HOME": str(home), "XRAYQ_DATA_DIR": str(data_dir)}
    return env, xrayq("train", str(data_dir / CHEST_TRAIN), *TINY_TRAIN_ARGS, env=env)


@pytest.fixture(scope="session")
def embedded_env(embedded_training) -> dict[str, str]:
    return embedded_training[0]


SCU_AE_TITLE = "TESTSCU"
OTHER_SCU_AE_TITLE = "MODALITY2"


class SrReceiver:
    """A PACS stand-in: a real pynetdicom C-STORE SCP that keeps what it is sent (the SRs coming back)."""

    ae_title = "RESULTS"

    def __init__(self) -> None:
        from pynetdicom import AE, evt

        self.port = free_port()
        self.received: list = []
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive SR Storage
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        self.received.append(event.dataset)
        return 0x0000

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="session")
def sr_receiver():
    receiver = SrReceiver()
    yield receiver
    receiver.close()


# Session-scoped, so each mode's stack (a minute to start) serves every e2e module.
@pytest.fixture(scope="session")
def e2e_services_env(services_env, tmp_path_factory, data_dir):
    """The services mode with a database, Redis key prefix and bucket of its own, and a tiny model.

    The stacks live for the whole session: sharing the integration tests' namespaces, their workers
    and trainer would consume the messages those tests publish and inspect.
    """
    home = tmp_path_factory.mktemp("e2e-services-home")
    with services_env_of_its_own(services_env, home, "e2e", data_dir) as env:
        yield env


@pytest.fixture(scope="session", params=["embedded", "services"])
def stack(request, tmp_path_factory, sr_receiver):
    if request.param == "embedded":
        env = request.getfixturevalue("embedded_env")
    else:
        env = request.getfixturevalue("e2e_services_env")
    running = Stack(env, tmp_path_factory.mktemp("logs") / f"{request.param}.log", sr_receiver.address)
    running.start()
    running.mode = request.param
    yield running
    running.stop()
