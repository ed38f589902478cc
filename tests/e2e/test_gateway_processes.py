"""`xrayq gateway` with XRAYQ_GATEWAY_PROCESSES=3, as a real process tree on one port: requests spread
over the processes, /metrics sums them, a long-poll is answered whichever process serves it, one process
runs the housekeeping, and killing a process (even that one) leaves the gateway answering."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from loadtest.harness.processes import start_process, stop_process, wait_ready
from shared.core.errors import XrayqError
from shared.db.process_lock import advisory_key
from shared.db.session import Database
from shared.jobs.lifecycle import claim_jobs, record_outcomes
from tests.conftest import ADMIN_HEADERS, free_port, services_env_of_its_own, settings_from_env

pytestmark = pytest.mark.e2e
PROCESSES = 3


class Gateway:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.url = f"http://127.0.0.1:{env['XRAYQ_PORT']}"
        self.process = start_process([sys.executable, "-m", "services.cli", "gateway"], env, log)
        self.log = log

    def fresh_client(self) -> httpx.Client:
        """A client that opens a new connection per request: each may be accepted by another process."""
        return httpx.Client(
            base_url=self.url, headers=ADMIN_HEADERS, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
        )

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Every sample of /metrics, by sample name and then by its labels."""
        body = httpx.get(f"{self.url}/metrics", headers=ADMIN_HEADERS, timeout=30).text
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
        return samples

    def by_pid(self, name: str) -> dict[int, float]:
        return {int(dict(labels)["pid"]): value for labels, value in self.metrics()[name].items()}

    def healthz_count(self) -> float:
        labels = (("method", "GET"), ("route", "/healthz"), ("status", "200"))
        return self.metrics()["xrayq_http_requests_total"].get(labels, 0.0)


def until(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.fixture(scope="module")
def gateway(services_env, tmp_path_factory, data_dir):
    home = tmp_path_factory.mktemp("gateway-processes")
    # A database of its own: the lock is per database, and another stack's gateway must not hold it.
    with services_env_of_its_own(services_env, home, "gwprocs", data_dir) as env:
        running = Gateway(
            {
                **env,
                "XRAYQ_PORT": str(free_port()),
                "XRAYQ_GATEWAY_PROCESSES": str(PROCESSES),
                "XRAYQ_STUDY_CHECK_INTERVAL_S": "0.2",  # the housekeeping lock is asked for at each pass
                "XRAYQ_RECONCILE_INTERVAL_S": "0.5",
            },
            home / "gateway.log",
        )
        try:
            if not wait_ready(running.url, 90, process=running.process, interval=0.3):
                pytest.fail(f"gateway not ready:\n{running.log.read_text()[-3000:]}")
            until(lambda: len(running.by_pid("xrayq_gateway_process_requests")) == PROCESSES, 90, "every process up")
            yield running
        finally:
            stop_process(running.process)


def test_requests_spread_over_the_processes_and_metrics_sum_them(gateway) -> None:
    before_total = gateway.healthz_count()
    before = gateway.by_pid("xrayq_gateway_process_requests")
    sent = 0
    with gateway.fresh_client() as client, ThreadPoolExecutor(8) as pool:

        def served_by() -> set[int]:
            now = gateway.by_pid("xrayq_gateway_process_requests")
            return {pid for pid, count in now.items() if count > before.get(pid, 0.0)}

        # Which process accepts a connection is the kernel's choice: send rounds until several served.
        deadline = time.monotonic() + 60
        while len(served_by()) < 2 and time.monotonic() < deadline:
            codes = list(pool.map(lambda _: client.get("/healthz").status_code, range(40)))
            assert codes == [200] * 40
            sent += 40
    assert len(served_by()) >= 2, "every request went to one process"
    # The counters are the sum over the processes, exactly (a process counts a request just after answering it).
    until(lambda: gateway.healthz_count() - before_total == sent, 10, f"{sent} /healthz requests counted")
    assert gateway.healthz_count() - before_total == sent


def test_a_long_poll_is_answered_when_the_result_lands(gateway, chest_images) -> None:
    with gateway.fresh_client() as client:
        image = chest_images["NORMAL"][0]
        accepted = client.post("/v1/jobs", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]

        # Several long-polls on connections of their own, so they are served by different processes.
        sent = threading.Semaphore(0)
        waiting = httpx.Client(
            base_url=gateway.url,
            headers=ADMIN_HEADERS,
            timeout=60,
            limits=httpx.Limits(max_keepalive_connections=0),
            event_hooks={"request": [lambda request: sent.release()]},
        )
        with waiting, ThreadPoolExecutor(6) as pool:
            polls = [pool.submit(waiting.get, f"/v1/jobs/{job_id}", params={"wait": 30}) for _ in range(6)]
            for _ in polls:
                assert sent.acquire(timeout=30)
            database = Database(gateway.env["XRAYQ_DATABASE_URL"])
            until(lambda: _waiters_watching(database, job_id), 30, "the gateway's waiters asking about the job")
            # The worker's part, done here through the same lifecycle calls: no process of the gateway
            # wrote this result, so each is told by the database.
            settings = settings_from_env(gateway.env)
            with database.session() as session:
                claim = claim_jobs(session, [job_id], settings)
            with database.session() as session:
                record_outcomes(
                    session, failures=[(claim.jobs[0], XrayqError("image_unreadable", "as a worker would"))]
                )
            landed = time.monotonic()
            views = [poll.result(timeout=40) for poll in polls]
    assert all(view.status_code == 200 for view in views)
    assert {view.json()["status"] for view in views} == {"failed"}
    assert time.monotonic() - landed < 10, "the long-polls waited for their timeout instead of the result"


def test_exactly_one_process_runs_the_housekeeping(gateway) -> None:
    active = until(lambda: _one_leader(gateway), 20, "exactly one housekeeping process")
    assert len(active) == PROCESSES
    database = Database(gateway.env["XRAYQ_DATABASE_URL"])
    with database.engine.connect() as connection:
        holders = connection.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :low"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"low": advisory_key("gateway-housekeeping") & 0xFFFFFFFF},
        ).scalar()
    assert holders == 1


def test_killing_a_process_leaves_the_gateway_answering(gateway) -> None:
    counted = gateway.healthz_count()
    kill_the_housekeeping_process(gateway, PROCESSES)
    assert gateway.healthz_count() >= counted + 40, "a dead process's requests stay in the sums"


def test_embedded_processes_take_turns_through_a_file_lock(tmp_path) -> None:
    """The embedded mode (SQLite, file-system broker) with two processes: the lock is a file beside the database."""
    env = {
        "XRAYQ_HOME": str(tmp_path / "home"),
        "XRAYQ_PORT": str(free_port()),
        "XRAYQ_GATEWAY_PROCESSES": "2",
        "XRAYQ_STUDY_CHECK_INTERVAL_S": "0.2",
    }
    migrated = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate"], env={**os.environ, **env}, capture_output=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    embedded = Gateway(env, tmp_path / "gateway.log")
    try:
        assert wait_ready(embedded.url, 90, path="/healthz", process=embedded.process, interval=0.3)
        until(lambda: len(embedded.by_pid("xrayq_gateway_process_requests")) == 2, 90, "both processes up")
        lock_file = tmp_path / "home" / "xrayq.db.gateway-housekeeping.lock"
        until(lock_file.exists, 30, "the housekeeping lock file")  # made by the first housekeeping pass
        kill_the_housekeeping_process(embedded, 2)
    finally:
        stop_process(embedded.process)


def kill_the_housekeeping_process(gateway: Gateway, processes: int) -> None:
    """Kill -9 the process that runs the housekeeping: the gateway goes on answering, another process
    takes the housekeeping over, and uvicorn starts a replacement, while the dead one leaves the gauges."""
    active = until(lambda: _one_leader(gateway), 20, "exactly one housekeeping process")
    leader = next(pid for pid, value in active.items() if value == 1)
    os.kill(leader, signal.SIGKILL)

    with gateway.fresh_client() as client, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: client.get("/healthz").status_code, range(40)))
    assert codes == [200] * 40

    def recovered() -> dict[int, float] | None:
        now = _one_leader(gateway)
        return now if now and leader not in now and len(now) == processes else None

    until(recovered, 60, "a new housekeeping process and a replacement for the killed one")
    assert gateway.process.poll() is None


def _waiters_watching(database: Database, job_id: str) -> bool:
    """A waiter's tick (services/gateway/waiter.py) is the query of finished jobs among those waited on;
    psycopg2 sends the ids inline, so the server's view of each connection's last query shows them."""
    with database.engine.connect() as connection:
        return bool(
            connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE query LIKE :job AND query LIKE '%status IN%'"),
                {"job": f"%{job_id}%"},
            ).scalar()
        )


def _one_leader(gateway: Gateway) -> dict[int, float] | None:
    active = gateway.by_pid("xrayq_gateway_housekeeping_active")
    return active if sum(active.values()) == 1 else None
