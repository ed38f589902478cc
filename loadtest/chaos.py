"""Chaos run: the services-mode stack as real processes, under load, while its parts are killed.

It starts its own Postgres cluster (initdb as the postgres user; where that is impossible it uses the
local server and a "restart" drops every connection of the stack instead), its own Redis (no
persistence: a restart loses every queued message) and S3 server (moto) on loopback ports, trains a
tiny model, and runs `xrayq up` plus a second worker. Clients submit single images and batches
(retrying failed requests with the same Idempotency-Key, as a PACS integration would) while a chaos
schedule kill -9s workers, restarts Redis, crash-restarts Postgres (`pg_ctl -m immediate`) and
kill -9s the gateway. Then it waits for every job to finish and checks, from the database: no accepted
job lost, none created twice, each with exactly one outcome, and batch counts that add up.

    python loadtest/chaos.py            # the full run (thousands of images)
    python loadtest/chaos.py --quick    # the small run `make test` does

Prints one JSON document; exits 1 if anything was lost or doubled.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
SHARED_POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
ADMIN_KEY = f"xq_chaos_{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
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


def children_of(pid: int, role: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and role.encode() in cmdline:
            found.append(int(entry.name))
    return found


class PrivatePostgres:
    """A throw-away Postgres cluster of our own, so it can really be restarted (crash-style)."""

    def __init__(self, workdir: Path) -> None:
        self.bindir = self.find_bindir()
        self.dir = workdir / "postgres"
        self.port = free_port()
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def find_bindir() -> Path | None:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
        return candidates[0].parent if candidates and shutil.which("runuser") else None

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=60)

    def _options(self) -> str:
        return f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"

    def start(self) -> None:
        assert self.bindir is not None
        self.dir.parent.chmod(0o755)  # mkdtemp's 0700 would keep the postgres user out
        self.dir.mkdir(parents=True)
        shutil.chown(self.dir, "postgres")
        self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")
        self._as_postgres(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.dir / "data"),
            "-o",
            self._options(),
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )

    def restart(self) -> None:
        # "immediate": like a crash (no clean shutdown, WAL recovery on start).
        self._as_postgres(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.dir / "data"),
            "-m",
            "immediate",
            "-o",
            self._options(),
            "-l",
            str(self.dir / "log"),
            "-w",
            "restart",
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop")


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
        self.env = {
            "XRAYQ_HOME": str(workdir / "home"),
            "XRAYQ_DATA_DIR": str(data_dir),
            "XRAYQ_PORT": str(self.port),
            "XRAYQ_DICOM_PORT": "0",  # no DICOM receiver: this run is about the HTTP path
            "XRAYQ_DATABASE_URL": admin_url.rsplit("/", 1)[0] + f"/{self.database}",
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
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.redis: subprocess.Popen[bytes] | None = None
        self.s3: subprocess.Popen[bytes] | None = None
        self.stack: subprocess.Popen[bytes] | None = None
        self.extra_worker: subprocess.Popen[bytes] | None = None
        self.events: list[dict[str, Any]] = []

    # --- lifecycle ---

    def start_redis(self) -> None:
        self.redis = spawn(
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            {},
            self.workdir / "redis.log",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.redis_port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("redis did not start")

    def setup(self, train_args: list[str]) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.database}"'))
        self.start_redis()
        self.s3 = spawn(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(self.s3_port)],
            {},
            self.workdir / "s3.log",
        )
        time.sleep(1.5)
        data = Path(self.env["XRAYQ_DATA_DIR"]) / "chest-xray-224" / "train"
        subprocess.run(
            [sys.executable, "-m", "services.cli", "train", str(data), *train_args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            check=True,
            capture_output=True,
            timeout=600,
        )
        self.stack = spawn(
            [sys.executable, "-m", "services.cli", "up", "--no-starter"], self.env, self.workdir / "stack.log"
        )
        self.extra_worker = spawn(
            [sys.executable, "-m", "services.cli", "worker"], self.env, self.workdir / "worker2.log"
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"stack not ready; see {self.workdir / 'stack.log'}")

    def teardown(self) -> None:
        for process in (self.extra_worker, self.stack, self.s3, self.redis):
            stop(process)
        with contextlib.suppress(Exception), self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
        self.admin.dispose()
        if self.postgres is not None:
            self.postgres.stop()

    # --- faults ---

    def kill_worker(self) -> None:
        assert self.stack is not None
        victims = children_of(self.stack.pid, "worker")
        if random.random() < 0.5 and self.extra_worker is not None:
            os.killpg(self.extra_worker.pid, signal.SIGKILL)  # the unsupervised one: start it again by hand
            self.extra_worker.wait()
            self.extra_worker = spawn(
                [sys.executable, "-m", "services.cli", "worker"], self.env, self.workdir / "worker2.log"
            )
            self.record("kill -9 worker (standalone), restarted")
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.record("kill -9 worker (supervised)")

    def restart_redis(self) -> None:
        stop(self.redis, signal.SIGKILL)
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
        for pid in children_of(self.stack.pid, "gateway"):
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


def load_images(data_dir: Path, count: int) -> list[tuple[str, bytes]]:
    paths = sorted((data_dir / "chest-xray-224" / "train").glob("*/*.jpeg"))
    return [(p.name, p.read_bytes()) for p in paths[:: max(1, len(paths) // count)][:count]]


def main() -> int:
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
        chaos.started = time.monotonic()
        client = Client(chaos.url, deadline_s=120)
        accepted_singles: dict[str, str] = {}
        accepted_batches: dict[str, dict[str, Any]] = {}
        lock = threading.Lock()

        def send_single(index: int) -> None:
            name, data = images[index % len(images)]
            key = f"single-{index}"
            body = client.submit("/v1/jobs", {"file": (f"{index:05d}-{name}", data)}, key)
            if body:
                with lock:
                    accepted_singles[key] = body["id"]

        def send_batch(index: int) -> None:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as archive:
                for j in range(args.batch_size):
                    name, data = images[(index * args.batch_size + j) % len(images)]
                    archive.writestr(f"{j:03d}-{name}", data)
            key = f"batch-{index}"
            body = client.submit("/v1/batches", {"files": ("study.zip", buffer.getvalue())}, key)
            if body:
                with lock:
                    accepted_batches[key] = body

        stop_faults = threading.Event()
        faults = threading.Thread(target=chaos.run_schedule, args=(stop_faults, args.fault_period), daemon=True)
        faults.start()
        work = [(send_single, i) for i in range(args.singles)] + [(send_batch, i) for i in range(args.batches)]
        random.Random(7).shuffle(work)

        pace = args.duration / max(1, len(work))

        def paced(position: int) -> None:
            # Spread over --duration, so faults land while work arrives and while it runs.
            time.sleep(max(0.0, chaos.started + position * pace - time.monotonic()))
            send, index = work[position]
            send(index)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(paced, range(len(work))))
        stop_faults.set()
        faults.join()
        submitted_s = time.monotonic() - chaos.started
        report.update(verify(chaos, accepted_singles, accepted_batches, args))
        report["submit_seconds"] = round(submitted_s, 1)
        report["client_retries"] = client.retries
        report["faults"] = chaos.events
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
