"""What syncing costs an accepted job in the embedded mode: one input object (150 kB), one SQLite commit
and one spool message per job, with the syncs xrayq makes and with every fsync skipped (SQLite NORMAL).

    python -m loadtest.embedded_fsync_cost [FOLDER]   # FOLDER: on the disk XRAYQ_HOME will live on
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from shared.core.queue import PREDICT_QUEUE, PREDICT_TASK, make_celery
from shared.core.settings import Settings
from shared.core.storage import make_object_store
from shared.db.session import database_for

JOBS = 200


def per_job_ms(home: Path, synced: bool) -> list[float]:
    settings = Settings(home=home)
    store, app, database = make_object_store(settings), make_celery(settings), database_for(settings)
    if not synced:

        @event.listens_for(database.engine, "connect")
        def unsynced(connection: Any, _record: Any) -> None:  # runs after xrayq's own pragmas
            connection.execute("PRAGMA synchronous=NORMAL")

    with database.engine.begin() as connection:
        connection.execute(text("CREATE TABLE accepted (id integer primary key, name text)"))
    data = os.urandom(150_000)
    took = []
    for i in range(JOBS):
        started = time.perf_counter()
        store.put(f"inputs/bench/{i}.png", data)
        with database.engine.begin() as connection:
            connection.execute(text("INSERT INTO accepted (name) VALUES (:name)"), {"name": str(i)})
        app.send_task(PREDICT_TASK, args=[[str(i)]], queue=PREDICT_QUEUE)
        took.append((time.perf_counter() - started) * 1000)
    return sorted(took)


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else None
    real_fsync = os.fsync
    for synced in (False, True):
        os.fsync = real_fsync if synced else (lambda fd: None)
        with tempfile.TemporaryDirectory(dir=folder) as home:
            took = per_job_ms(Path(home), synced)
        label = "synced  " if synced else "unsynced"
        print(f"{label} median {statistics.median(took):.2f} ms, p95 {took[int(0.95 * JOBS)]:.2f} ms per accepted job")
    os.fsync = real_fsync


if __name__ == "__main__":
    main()
