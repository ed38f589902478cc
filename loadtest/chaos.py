"""Chaos run: the services-mode stack as real processes, under load, while its parts are killed.

It starts its own Postgres cluster (initdb as the postgres user; where that is impossible it uses the
local server and a "restart" drops every connection of the stack instead), its own Redis (no
persistence: a restart loses every queued message) and S3 server (moto) on loopback ports, trains a
tiny model, and runs `xrayq up` plus a second worker. Clients submit single images and batches
(retrying failed requests with the same Idempotency-Key, as a PACS integration would) while a chaos
schedule kill -9s workers, restarts Redis, crash-restarts Postgres (`pg_ctl -m immediate`) and
kill -9s the gateway. Then it waits for every job to finish and checks, from the database: no accepted
job lost, none created twice, each with exactly one outcome, and batch counts that add up.

    python -m loadtest.chaos            # the full run (thousands of images)
    python -m loadtest.chaos --quick    # the small run `make test` does

Prints one JSON document; exits 1 if anything was lost or doubled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from loadtest.harness.images import CHEST_TRAIN, load_images, zip_bytes
from loadtest.harness.postgres import PrivatePostgres
from loadtest.harness.processes import (
    ROOT,
    child_pids,
    free_port,
    start_process,
    stop_process,
    wait_for_port,
    wait_ready,
)

SHARED_POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
ADMIN_KEY = f"xq_chaos_{uuid.uuid4().hex}"


class Chaos:
    """The stack and its dependencies, with the faults to inject."""

    def __init__(self, workdir: Path, data_dir: Path) -> None:
        self.workdir = workdir
        # A private cluster can be truly restarted; without one (no runuser, no binaries), the shared
        # server stays up and a "restart" drops every connection of the stack instead.
        self.postgres = PrivatePostgres(workdir) if PrivatePostgres.find_bindir() else None
        if self.postgres is not None:
            self.postgres.start()
        admin_url = self.postgres.url if self.postgres else SHARED_POSTGRES_URL
        self.redis_port, self.s3_port, self.port = free_port(), free_port(), free_port()
        self.database = f"xrayq_chaos_{uuid.uuid4().hex[:10]}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = self.stack_env(data_dir, database_url=admin_url.rsplit("/", 1)[0] + f"/{self.database}")
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.redis: subprocess.Popen[bytes] | None = None
        self.s3: subprocess.Popen[bytes] | None = None
        self.stack: subprocess.Popen[bytes] | None = None
        self.extra_worker: subprocess.Popen[bytes] | None = None
        self.events: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def stack_env(self, data_dir: Path, database_url: str) -> dict[str, str]:
        """The services mode on our own ports, with a quick reconciler so lost work is found in seconds."""
        return {
            "XRAYQ_HOME": str(self.workdir / "home"),
            "XRAYQ_DATA_DIR": str(data_dir),
            "XRAYQ_PORT": str(self.port),
            "XRAYQ_DICOM_PORT": "0",  # no DICOM receiver: this run is about the HTTP path
            "XRAYQ_DATABASE_URL": database_url,
            "XRAYQ_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "XRAYQ_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
            "XRAYQ_S3_BUCKET": "xrayq-chaos",
            "XRAYQ_S3_ACCESS_KEY": "chaos",
            "XRAYQ_S3_SECRET_KEY": "chaos",
            "XRAYQ_ADMIN_KEY": ADMIN_KEY,
            "XRAYQ_RECONCILE_INTERVAL_S": "1",
            "XRAYQ_REQUEUE_AFTER_S": "5",
            "XRAYQ_STALE_RUNNING_AFTER_S": "20",
            "XRAYQ_MAX_ATTEMPTS": "5",
            "XRAYQ_WORKER_METRICS_PORT": "0",
            "XRAYQ_LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }

    # --- lifecycle ---

    def start_redis(self) -> None:
        # No snapshots, no append-only file: a restart loses every queued message, the worst case.
        args = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.redis = start_process(args, {}, self.workdir / "redis.log")
        if not wait_for_port(self.redis_port, 10):
            raise RuntimeError("redis did not start")

    def start_s3(self) -> None:
        moto = str(Path(sys.executable).with_name("moto_server"))
        self.s3 = start_process([moto, "-H", "127.0.0.1", "-p", str(self.s3_port)], {}, self.workdir / "s3.log")
        if not wait_for_port(self.s3_port, 30):
            raise RuntimeError(f"the S3 server did not start; see {self.workdir / 's3.log'}")

    def start_worker(self) -> subprocess.Popen[bytes]:
        """A worker outside the supervisor, so that two workers share the queue."""
        return start_process([sys.executable, "-m", "services.cli", "worker"], self.env, self.workdir / "worker2.log")

    def setup(self, train_args: list[str]) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.database}"'))
        self.start_redis()
        self.start_s3()
        subprocess.run(
            [sys.executable, "-m", "services.cli", "train", str(Path(self.env["XRAYQ_DATA_DIR"]) / CHEST_TRAIN)]
            + train_args,
            cwd=ROOT,
            env={**os.environ, **self.env},
            check=True,
            capture_output=True,
            timeout=600,
        )
        self.stack = start_process(
            [sys.executable, "-m", "services.cli", "up", "--no-starter"], self.env, self.workdir / "stack.log"
        )
        self.extra_worker = self.start_worker()
        if not wait_ready(self.url, 120, process=self.stack):
            raise RuntimeError(f"stack not ready; see {self.workdir / 'stack.log'}")

    def teardown(self) -> None:
        for process in (self.extra_worker, self.stack, self.s3, self.redis):
            stop_process(process)
        with contextlib.suppress(Exception), self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
        self.admin.dispose()
        if self.postgres is not None:
            self.postgres.stop()

    # --- faults ---

    def kill_worker(self) -> None:
        assert self.stack is not None
        victims = child_pids(self.stack.pid, "worker")
        if random.random() < 0.5 and self.extra_worker is not None:
            os.killpg(self.extra_worker.pid, signal.SIGKILL)  # the unsupervised one: start it again by hand
            self.extra_worker.wait()
            self.extra_worker = self.start_worker()
            self.record("kill -9 worker (standalone), restarted")
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.record("kill -9 worker (supervised)")

    def restart_redis(self) -> None:
        stop_process(self.redis, signal.SIGKILL)
        time.sleep(1.0)
        self.start_redis()
        self.record("restart redis (queued messages lost)")

    def restart_postgres(self) -> None:
        if self.postgres is not None:
            self.postgres.restart()
            self.record("restart postgres (immediate: crash-style)")
            return
        with self.admin.connect() as connection:
            dropped = connection.execute(
                text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :name"),
                {"name": self.database},
            ).scalar()
        self.record(f"postgres: dropped all {dropped} connections of the stack")

    def kill_gateway(self) -> None:
        assert self.stack is not None
        for pid in child_pids(self.stack.pid, "gateway"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.record("kill -9 gateway (supervised)")

    def record(self, what: str) -> None:
        self.events.append({"t": round(time.monotonic() - self.started, 1), "fault": what})

    def run_schedule(self, stop_event: threading.Event, period: float) -> None:
        faults = [
            self.kill_worker,
            self.restart_redis,
            self.kill_worker,
            self.restart_postgres,
            self.kill_worker,
            self.kill_gateway,
        ]
        index = 0
        while not stop_event.wait(period):
            try:
                faults[index % len(faults)]()
            except Exception as exc:  # a fault that could not be injected is reported, not fatal
                self.record(f"fault failed: {exc!r}")
            index += 1


class Client:
    """A PACS-like client: retries until accepted, always with the same Idempotency-Key."""

    def __init__(self, url: str, deadline_s: float) -> None:
        self.http = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        self.deadline_s = deadline_s
        self.retries = 0
        self.lock = threading.Lock()

    def submit(self, path: str, files: Any, key: str) -> dict[str, Any] | None:
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            try:
                response = self.http.post(path, files=files, headers={"Idempotency-Key": key})
                if response.status_code == 202:
                    return response.json()
                if 400 <= response.status_code < 500:
                    raise RuntimeError(f"{path} refused: {response.status_code} {response.text[:200]}")
            except httpx.HTTPError:
                pass
            with self.lock:
                self.retries += 1
            time.sleep(0.3)
        return None


class Workload:
    """Single images and ZIP batches sent by PACS-like clients while faults land, and what was accepted."""

    def __init__(self, client: Client, images: list[tuple[str, bytes]], batch_size: int) -> None:
        self.client = client
        self.images = images
        self.batch_size = batch_size
        self.accepted_singles: dict[str, str] = {}  # Idempotency-Key -> job id
        self.accepted_batches: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> the batch as answered
        self.lock = threading.Lock()

    def send_single(self, index: int) -> None:
        name, data = self.images[index % len(self.images)]
        key = f"single-{index}"
        body = self.client.submit("/v1/jobs", {"file": (f"{index:05d}-{name}", data)}, key)
        if body:
            with self.lock:
                self.accepted_singles[key] = body["id"]

    def send_batch(self, index: int) -> None:
        entries = []
        for j in range(self.batch_size):
            name, data = self.images[(index * self.batch_size + j) % len(self.images)]
            entries.append((f"{j:03d}-{name}", data))
        key = f"batch-{index}"
        body = self.client.submit("/v1/batches", {"files": ("study.zip", zip_bytes(entries))}, key)
        if body:
            with self.lock:
                self.accepted_batches[key] = body

    def send_all(self, singles: int, batches: int, started: float, duration: float) -> None:
        """Every single and batch in a fixed shuffled order, by 8 senders, spread over `duration` seconds
        from `started`, so faults land while work arrives and while it runs."""
        work = [(self.send_single, i) for i in range(singles)] + [(self.send_batch, i) for i in range(batches)]
        random.Random(7).shuffle(work)
        pace = duration / max(1, len(work))

        def paced(position: int) -> None:
            time.sleep(max(0.0, started + position * pace - time.monotonic()))
            send, index = work[position]
            send(index)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(paced, range(len(work))))


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small run of `make test`")
    parser.add_argument("--singles", type=int, default=1500)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--fault-period", type=float, default=4.0, help="seconds between faults")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds over which submissions are spread")
    default_data = os.environ.get("XRAYQ_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--data-dir", type=Path, default=Path(default_data))
    args = parser.parse_args()
    if args.quick:
        args.singles, args.batches, args.batch_size, args.fault_period, args.duration = 150, 8, 20, 2.0, 20.0
    return args


def run_under_faults(chaos: Chaos, args: argparse.Namespace, images: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Send the workload while the fault schedule runs, then check what became of every accepted job."""
    chaos.started = time.monotonic()
    client = Client(chaos.url, deadline_s=120)
    workload = Workload(client, images, args.batch_size)
    stop_faults = threading.Event()
    faults = threading.Thread(target=chaos.run_schedule, args=(stop_faults, args.fault_period), daemon=True)
    faults.start()
    workload.send_all(args.singles, args.batches, chaos.started, args.duration)
    stop_faults.set()
    faults.join()
    submitted_s = time.monotonic() - chaos.started
    return {
        **verify(chaos, workload.accepted_singles, workload.accepted_batches, args),
        "submit_seconds": round(submitted_s, 1),
        "client_retries": client.retries,
        "faults": chaos.events,
    }


def main() -> int:
    args = parse_arguments()
    workdir = Path(tempfile.mkdtemp(prefix="xrayq-chaos-"))
    chaos = Chaos(workdir, args.data_dir.resolve())
    images = load_images(args.data_dir, 200)
    report: dict[str, Any] = {
        "workdir": str(workdir),
        "singles": args.singles,
        "batches": args.batches,
        "batch_size": args.batch_size,
    }
    try:
        chaos.setup(["--max-per-class", "48", "--epochs", "1", "--image-size", "64"])
        report.update(run_under_faults(chaos, args, images))
    finally:
        chaos.teardown()
    print(json.dumps(report, indent=2))
    return 0 if report.get("ok") else 1


def verify(chaos: Chaos, singles: dict[str, str], batches: dict[str, dict[str, Any]], args: Any) -> dict[str, Any]:
    """Wait for every job to finish, then compare what clients were told with the database."""
    engine = create_engine(chaos.env["XRAYQ_DATABASE_URL"])
    expected_jobs = set(singles.values()) | {job_id for body in batches.values() for job_id in body["job_ids"]}
    deadline = time.monotonic() + 300
    with engine.connect() as connection:
        while time.monotonic() < deadline:
            open_jobs = connection.execute(
                text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
            ).scalar()
            if open_jobs == 0:
                break
            time.sleep(1)
        rows = connection.execute(text("SELECT id, status, batch_id, label, error_code, attempts FROM jobs")).all()
        batch_rows = connection.execute(text("SELECT id, total FROM batches")).all()
    engine.dispose()
    in_db = {row.id: row for row in rows}
    lost = sorted(expected_jobs - set(in_db))
    unfinished = sorted(
        job_id for job_id in expected_jobs if job_id in in_db and in_db[job_id].status in ("queued", "running")
    )
    extra = sorted(set(in_db) - expected_jobs)  # created but never acknowledged to a client: doubled
    both_or_neither = sorted(
        row.id
        for row in rows
        if row.status in ("succeeded", "failed") and (row.label is None) == (row.error_code is None)
    )
    per_batch = Counter(row.batch_id for row in rows if row.batch_id)
    bad_batches = sorted(batch.id for batch in batch_rows if per_batch[batch.id] != batch.total)
    statuses = Counter(row.status for row in rows)
    errors = Counter(row.error_code for row in rows if row.error_code)
    return {
        "ok": not (lost or unfinished or extra or both_or_neither or bad_batches)
        and len(singles) == args.singles
        and len(batches) == args.batches,
        "accepted_jobs": len(expected_jobs),
        "accepted_singles": len(singles),
        "accepted_batches": len(batches),
        "jobs_in_database": len(in_db),
        "lost": len(lost),
        "unfinished": len(unfinished),
        "duplicated": len(extra),
        "results_not_exactly_one": len(both_or_neither),
        "batches_whose_counts_do_not_add_up": len(bad_batches),
        "statuses": dict(statuses),
        "error_codes": dict(errors),
        "max_attempts_seen": max((row.attempts for row in rows), default=0),
    }


if __name__ == "__main__":
    sys.exit(main())
