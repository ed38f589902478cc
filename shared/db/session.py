"""The engine and the one place where a unit of work commits or rolls back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import sqlalchemy
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker

from shared.core.settings import Settings


def make_engine(database_url: str) -> Engine:
    # `sqlalchemy.create_engine` looked up at each call: tracing (shared/core/tracing.py) wraps it.
    create_engine = sqlalchemy.create_engine
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # A pool as large as a gateway's busy thread pool: a connection opened per request (and its
        # pragmas) costs more than the query it runs.
        engine = create_engine(
            database_url,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=16,
            max_overflow=32,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # Gateway, worker and trainer are separate processes on one file: WAL lets readers run
            # beside the one writer, and busy_timeout makes writers wait instead of failing.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: in WAL mode each commit syncs the log, so a job answered 202 survives a power loss
            # (NORMAL may lose the last commits); see the README's "Hardened deployment" for its cost.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(database_url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Database:
    """An engine plus its session factory, built once per process from Settings."""

    def __init__(self, database_url: str) -> None:
        self.engine = make_engine(database_url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits when the block ends, rolls back if it raises."""
        session = self.sessions()
        try:
            yield session
        except BaseException:
            self.finish(session, commit=False)
            raise
        self.finish(session, commit=True)

    @staticmethod
    def finish(session: Session, *, commit: bool) -> None:
        """End a unit of work: commit (or roll back), and always give the connection back."""
        try:
            if commit:
                session.commit()
            else:
                session.rollback()
        finally:
            session.close()


def after_commit(session: Session, action: Callable[[], object]) -> None:
    """Run `action` once this unit of work has committed (never if it rolls back): for effects outside
    the database that must not run ahead of the rows they announce (forgetting a revoked key, a message)."""
    event.listen(session, "after_commit", lambda _session: action(), once=True)


@lru_cache(maxsize=8)
def get_database(database_url: str) -> Database:
    return Database(database_url)


def database_for(settings: Settings) -> Database:
    return get_database(settings.database_url)
