"""A lock that one process at a time holds, for work that must not run twice at once (the gateway's
reconciler and deliveries when several gateway processes or replicas share one database).

The lock lives where the processes already meet, and dies with its holder: a Postgres session-level
advisory lock (`pg_try_advisory_lock`) on a connection of its own in services mode, released by the
server when that connection closes, however the process ended; an `flock` on a file beside the
database file in embedded mode (SQLite: every process is on this host), released by the kernel when
the process's file descriptor closes. A holder never blocks: `hold()` answers at once, so the
processes that do not hold it go on serving and ask again at their next pass.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import threading
from pathlib import Path
from typing import IO, Protocol

from sqlalchemy import Connection, Engine, text

from shared.db.session import Database

log = logging.getLogger(__name__)


class ProcessLock(Protocol):
    def hold(self) -> bool:
        """True while this process holds the lock: takes it when it is free, keeps it once taken."""
        ...

    def release(self) -> None:
        """Let another process take it (also what the holder's death does)."""
        ...


def process_lock(database: Database, name: str) -> ProcessLock:
    """The lock called `name` among the processes that share `database`."""
    url = database.engine.url
    if url.get_backend_name() == "postgresql":
        return AdvisoryLock(database.engine, name)
    path = url.database or ""
    if url.get_backend_name() == "sqlite" and path and path != ":memory:":
        database_file = Path(path)
        return FileLock(database_file.with_name(f"{database_file.name}.{name}.lock"))
    return SoleHolder()


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for `name` (advisory locks are per database, so keys cannot clash
    with another database's)."""
    return int.from_bytes(hashlib.sha256(f"xrayq:{name}".encode()).digest()[:8], "big", signed=True)


class AdvisoryLock:
    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.key = advisory_key(name)
        self._mutex = threading.Lock()
        self._connection: Connection | None = None

    def hold(self) -> bool:
        with self._mutex:
            if self._connection is not None:
                try:  # still ours while its session lives; a dead connection took the lock with it
                    self._connection.execute(text("SELECT 1"))
                    return True
                except Exception:
                    log.warning("lost the connection that held lock %s", self.key, exc_info=True)
                    self._discard()
            try:
                # Autocommit: the connection idles between passes without an open transaction.
                connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            except Exception:
                log.warning("cannot reach the database to take lock %s", self.key, exc_info=True)
                return False
            try:
                taken = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar())
            except Exception:
                log.warning("cannot take lock %s", self.key, exc_info=True)
                connection.invalidate()
                return False
            if not taken:
                connection.close()  # holds nothing: back to the pool
                return False
            self._connection = connection
            return True

    def release(self) -> None:
        with self._mutex:
            if self._connection is None:
                return
            try:  # at once: the server ends a closed connection's session (and its locks) a moment later
                self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            except Exception:
                log.warning("could not unlock %s; closing its connection instead", self.key, exc_info=True)
            self._discard()

    def _discard(self) -> None:
        # Closed, never pooled: a pooled connection would keep the session's lock for whoever takes it next.
        assert self._connection is not None
        try:
            self._connection.invalidate()
        finally:
            self._connection = None


class FileLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._mutex = threading.Lock()
        self._file: IO[bytes] | None = None

    def hold(self) -> bool:
        with self._mutex:
            if self._file is not None:
                return True
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = self.path.open("ab")
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another process holds it
                file.close()
                return False
            self._file = file
            return True

    def release(self) -> None:
        with self._mutex:
            if self._file is not None:
                self._file.close()  # closing the descriptor drops the flock
                self._file = None


class SoleHolder:
    """An in-memory database is seen by one process only: nobody to exclude."""

    def hold(self) -> bool:
        return True

    def release(self) -> None:
        pass
