"""Workers on several hosts around one Redis, Postgres and S3 server (README: "Scaling past one host"):
jobs spread across the hosts; a rolling restart of every worker (the first drained with
`celery control cancel_consumer`, the others stopped with SIGTERM mid-chunk) loses and doubles nothing;
the loss of a host mid-batch, while it holds claimed jobs, loses and doubles nothing.

Each host is a Linux network namespace with its own address (see `worker_hosts`), running the real
`xrayq worker`; batches go through the real gateway in the root namespace, whose reconciler finds
the work of a vanished host. Per-host counts come from each worker's own /metrics endpoint, read over
the network at the host's address; "exactly once" from the database: each accepted job present once,
with exactly one outcome, and `attempts` (how many times workers took it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from loadtest.harness.images import load_images
from loadtest.harness.processes import ROOT, start_process, stop_process, wait_ready
from tests.conftest import ADMIN_HEADERS, free_port, services_env_of_its_own
from tests.e2e.worker_hosts import HostNetwork, WorkerHost, missing_prerequisites

pytestmark = pytest.mark.e2e

HOSTS = 3
CHUNK = 4  # images per message: many messages per batch, so every host gets some
# Quick reconciler: a vanished host's claims are presumed lost after 20 s (a chunk of 4 tiny images
# takes a fraction of a second, and seconds on a 2-core machine shared by many), its lost messages
# after 3 s.
CLUSTER_SETTINGS = {
    "XRAYQ_PREDICT_CHUNK_SIZE": str(CHUNK),
    "XRAYQ_RECONCILE_INTERVAL_S": "1",
    "XRAYQ_REQUEUE_AFTER_S": "3",
    "XRAYQ_STALE_RUNNING_AFTER_S": "20",
    "XRAYQ_DICOM_PORT": "0",
    "XRAYQ_LOG_LEVEL": "INFO",  # Celery's " ready." line says when a worker consumes
    "PYTHONUNBUFFERED": "1",
}


class Cluster:
    """The gateway (root namespace) and the worker hosts, with what a test needs to drive them."""

    def __init__(self, env: dict[str, str], network: HostNetwork, workdir: Path, images: list[tuple[str, bytes]]):
        self.env = env
        self.network = network
        self.workdir = workdir
        self.images = images
        self.url = f"http://127.0.0.1:{free_port()}"
        self.gateway: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, headers=ADMIN_HEADERS, timeout=60)
        self.engine = create_engine(env["XRAYQ_DATABASE_URL"])

    def start_gateway(self) -> None:
        port = self.url.rsplit(":", 1)[1]
        self.gateway = start_process(
            [sys.executable, "-m", "services.cli", "gateway"], {**self.env, "XRAYQ_PORT": port}, self.workdir / "gw.log"
        )
        if not wait_ready(self.url, 180, process=self.gateway, interval=0.2):
            pytest.fail(f"gateway not ready:\n{(self.workdir / 'gw.log').read_text()[-3000:]}")

    def live_hosts(self, count: int = HOSTS) -> list[WorkerHost]:
        """`count` hosts with a consuming worker: those still up, and new ones for any that were lost."""
        live = [host for host in self.network.hosts if not host.lost]
        while len(live) < count:
            host = self.network.add_host(self.network.services_as_seen_from_hosts(self.env))
            host.start_worker()
            live.append(host)
        for host in live:
            host.wait_ready()
        return live[:count]

    def submit_batch(self, count: int, offset: int = 0) -> dict:
        entries = [self.images[(offset + i) % len(self.images)] for i in range(count)]
        files = [("files", (f"{offset + i:04d}-{name}", data, "image/jpeg")) for i, (name, data) in enumerate(entries)]
        response = self.http.post("/v1/batches", files=files)
        assert response.status_code == 202, response.text
        return response.json()

    def batch_counts(self, batch_id: str) -> dict:
        return self.http.get(f"/v1/batches/{batch_id}", params={"limit": 1}).json()["counts"]

    def wait_batches(self, batch_ids: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        for batch_id in batch_ids:
            while True:
                view = self.http.get(f"/v1/batches/{batch_id}", params={"limit": 1, "wait": 5}, timeout=20).json()
                if view["status"] not in ("queued", "running"):
                    break
                assert time.monotonic() < deadline, f"batch {batch_id} unfinished after {timeout}s: {view['counts']}"

    def job_rows(self, batch_ids: list[str]) -> list:
        with self.engine.connect() as connection:
            return list(
                connection.execute(
                    text(
                        "SELECT id, batch_id, status, label, error_code, attempts FROM jobs WHERE batch_id = ANY(:ids)"
                    ),
                    {"ids": batch_ids},
                )
            )

    def close(self) -> None:
        stop_process(self.gateway)
        self.http.close()
        self.engine.dispose()


def assert_each_job_finished_once(cluster: Cluster, batches: list[dict]) -> list:
    """Every accepted job of `batches` is in the database once, succeeded, with exactly one result."""
    rows = cluster.job_rows([batch["id"] for batch in batches])
    accepted = {job_id for batch in batches for job_id in batch["job_ids"]}
    ids = [row.id for row in rows]
    assert len(ids) == len(set(ids)) == len(accepted) and set(ids) == accepted
    not_succeeded = [(row.id, row.status, row.error_code) for row in rows if row.status != "succeeded"]
    assert not not_succeeded, not_succeeded
    assert all(row.label is not None and row.error_code is None for row in rows)
    return rows


@pytest.fixture(scope="module")
def cluster(services_env, tmp_path_factory, data_dir):
    missing = missing_prerequisites()
    if missing:
        pytest.fail(f"the multi-host test cannot run: {missing}")
    workdir = tmp_path_factory.mktemp("worker-hosts")
    with services_env_of_its_own(services_env, workdir / "home", "hosts", data_dir) as own_env:
        env = {**own_env, **CLUSTER_SETTINGS}
        network = HostNetwork(workdir, env["XRAYQ_BROKER_URL"], env["XRAYQ_DATABASE_URL"], env["XRAYQ_S3_ENDPOINT_URL"])
        running = Cluster(env, network, workdir, load_images(data_dir, 200))
        try:
            network.start()
            for _ in range(HOSTS):  # all workers start together: their imports overlap
                network.add_host(network.services_as_seen_from_hosts(env)).start_worker()
            running.start_gateway()
            running.live_hosts()
            yield running
        finally:
            running.close()
            network.close()


def test_jobs_spread_across_worker_hosts(cluster: Cluster) -> None:
    hosts = cluster.live_hosts()
    before = {host.name: host.finished_jobs() for host in hosts}
    started = time.monotonic()
    total = 48
    batch = cluster.submit_batch(total)
    cluster.wait_batches([batch["id"]])
    elapsed = time.monotonic() - started

    per_host = {host.address: host.finished_jobs() - before[host.name] for host in hosts}
    print(f"\nspread of {total} jobs over {len(hosts)} hosts: {json.dumps(per_host)} in {elapsed:.1f}s")
    assert all(count > 0 for count in per_host.values()), per_host  # every host took part
    assert sum(per_host.values()) == total, per_host  # and no job was finished twice
    rows = assert_each_job_finished_once(cluster, [batch])
    assert {row.attempts for row in rows} == {1}  # no job was taken twice


def drain(cluster: Cluster, host: WorkerHost) -> str:
    """The README's drain: tell one worker, by its node name, to stop taking messages from `predict`."""
    ready = next(line for line in host.log_text(since_start=True).splitlines() if line.endswith(" ready."))
    node = ready.removesuffix(" ready.").split()[-1]  # e.g. predict-1234@hostname
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "services.worker.app", "control", "cancel_consumer", "predict"]
        + ["--destination", node],
        cwd=ROOT,
        env={**os.environ, **cluster.env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


def test_rolling_restart_of_workers_loses_and_doubles_nothing(cluster: Cluster) -> None:
    """Each host in turn, while batches run: stop it with SIGTERM (warm shutdown), wait for its exit,
    start it again, wait until it consumes, then the next host. The first is drained first, as the
    README's runbook does; the others get their SIGTERM in the middle of a chunk."""
    hosts = cluster.live_hosts()
    batches, shutdowns = [], []
    started = time.monotonic()

    first = hosts[0]
    answer = drain(cluster, first)
    assert "no longer consuming from predict" in answer, answer
    taken_before = first.tasks_since_start()[0]
    batches.append(cluster.submit_batch(6 * CHUNK))
    cluster.wait_batches([batches[-1]["id"]])
    assert first.tasks_since_start()[0] == taken_before  # drained: the others ran the whole batch
    shutdowns.append(round(first.warm_restart(), 1))
    first.wait_ready()

    for host in hosts[1:]:
        # Batches until the host is seen running a chunk (a quick one can finish between two looks).
        while True:
            batches.append(cluster.submit_batch(6 * CHUNK, offset=len(batches) * 6 * CHUNK))
            if host.wait_running_a_chunk(timeout=10):
                break
            assert len(batches) < 12, f"{host.name} was never seen running a chunk"
        shutdowns.append(round(host.warm_restart(), 1))  # asserts that its running chunk finished first
        host.wait_ready()
    cluster.wait_batches([batch["id"] for batch in batches])
    elapsed = time.monotonic() - started

    rows = assert_each_job_finished_once(cluster, batches)
    print(
        f"\nrolling restart of {len(hosts)} hosts under {len(rows)} jobs: warm shutdowns took {shutdowns} s;"
        f" all done in {elapsed:.1f}s"
    )
    assert {row.attempts for row in rows} == {1}  # warm shutdown: no job had to run again


def test_losing_a_worker_host_mid_batch_loses_and_doubles_nothing(cluster: Cluster) -> None:
    hosts = cluster.live_hosts()
    victim, survivors = hosts[0], hosts[1:]
    before = {host.name: host.finished_jobs() for host in hosts}
    per_batch = 16 * CHUNK
    batches: list[dict] = []
    # Mid-batch, at the moment the victim holds claimed jobs (batches until it is caught so).
    while True:
        batches.append(cluster.submit_batch(per_batch, offset=len(batches) * per_batch))
        caught = victim.freeze_holding_jobs(timeout=10)
        if caught is not None:
            break
        assert len(batches) < 6, f"{victim.name} was never seen holding jobs"
    victim.power_off()
    lost_at = time.monotonic()
    claimed, finished = caught
    held, victim_finished = claimed - finished, finished - before[victim.name]
    total = per_batch * len(batches)
    done_at_loss = sum(cluster.batch_counts(batch["id"])["succeeded"] for batch in batches)
    assert done_at_loss < total, "the batches ended before the host was lost"

    cluster.wait_batches([batch["id"] for batch in batches])
    recovered_s = time.monotonic() - lost_at
    rows = assert_each_job_finished_once(cluster, batches)
    retaken = sum(row.attempts == 2 for row in rows)
    per_survivor = {host.address: host.finished_jobs() - before[host.name] for host in survivors}
    print(
        f"\nhost {victim.address} lost holding {held} jobs, after finishing {victim_finished} of {total}"
        f" ({done_at_loss} done then); survivors finished"
        f" {json.dumps(per_survivor)}; {retaken} jobs taken again; all done {recovered_s:.1f}s after the loss"
    )
    # Taken at most twice, and twice only if the victim held it (its own write may have landed first).
    assert {row.attempts for row in rows} <= {1, 2} and retaken <= held <= CHUNK, (retaken, held)
    # Nothing finished twice: what the survivors finished and what the victim wrote (all it finished,
    # and perhaps the jobs it held, if their write landed) add up to the batches.
    left = total - victim_finished
    assert left - held <= sum(per_survivor.values()) <= left, per_survivor
