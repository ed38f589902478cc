"""One process at a time holds the housekeeping lock: a Postgres advisory lock in services mode, an
flock beside the SQLite file in embedded mode; a holder's death (even by -9) lets another take it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from shared.db.process_lock import AdvisoryLock, FileLock, process_lock
from shared.db.session import Database

ROOT = Path(__file__).resolve().parents[2]
NAME = "gateway-housekeeping"
HOLDER = """
import sys
from shared.db.process_lock import process_lock
from shared.db.session import Database
lock = process_lock(Database(sys.argv[1]), sys.argv[2])
print("held" if lock.hold() else "refused", flush=True)
sys.stdin.read()  # holds it until killed
"""


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request, tmp_path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'xrayq.db'}"


def until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_the_lock_fits_the_database(postgres_url, tmp_path) -> None:
    assert isinstance(process_lock(Database(postgres_url), NAME), AdvisoryLock)
    embedded = process_lock(Database(f"sqlite:///{tmp_path / 'xrayq.db'}"), NAME)
    assert isinstance(embedded, FileLock) and embedded.path == tmp_path / f"xrayq.db.{NAME}.lock"


def test_of_two_holders_only_one_holds_until_it_lets_go(database_url) -> None:
    first = process_lock(Database(database_url), NAME)
    second = process_lock(Database(database_url), NAME)
    other = process_lock(Database(database_url), "another-lock")
    try:
        assert first.hold()
        assert not second.hold()
        assert first.hold(), "the holder keeps it, pass after pass"
        assert not second.hold()
        assert other.hold(), "a lock of another name is another lock"
        first.release()
        assert second.hold()
        assert not first.hold()
    finally:
        for lock in (first, second, other):
            lock.release()


def test_a_holder_killed_with_minus_9_lets_another_take_it(database_url) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, database_url, NAME],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lock = process_lock(Database(database_url), NAME)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not lock.hold()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert until(lock.hold), "the dead holder's lock was not released"
    finally:
        lock.release()
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_holder_whose_connection_the_server_ended_no_longer_claims_it(postgres_url) -> None:
    database = Database(postgres_url)
    first, second = AdvisoryLock(database.engine, NAME), AdvisoryLock(Database(postgres_url).engine, NAME)
    try:
        assert first.hold()
        with database.engine.connect() as admin:  # e.g. Postgres restarted, or an operator ended the session
            ended = admin.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objid = :low"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"low": first.key & 0xFFFFFFFF},
            ).all()
        assert ended == [(True,)]
        assert until(second.hold)
        assert not first.hold(), "a holder whose session ended must not go on as if it held the lock"
    finally:
        first.release()
        second.release()
