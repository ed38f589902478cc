"""The database half of a backup: Postgres through its own tools (`pg_dump` custom format, `pg_restore`),
the embedded SQLite file through SQLite's online backup API. Both give one consistent snapshot while the
stack keeps running."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, create_engine, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

from shared.core.errors import XrayqError
from shared.core.settings import Settings

DatabaseKind = Literal["postgresql", "sqlite"]


def database_kind(settings: Settings) -> DatabaseKind:
    return "sqlite" if settings.uses_sqlite else "postgresql"


@contextlib.contextmanager
def _connection(database_url: str, **options: Any) -> Iterator[Connection]:
    """A connection for one check; an unreachable database is a sentence, not a traceback."""
    engine = create_engine(database_url, **options)
    try:
        with engine.connect() as connection:
            yield connection
    except OperationalError as exc:
        raise XrayqError("backup_failed", f"cannot use the database {make_url(database_url)!r}: {exc.orig}") from None
    finally:
        engine.dispose()


def current_revision(database_url: str) -> str:
    with _connection(database_url) as connection:
        if not inspect(connection).has_table("alembic_version"):
            raise XrayqError("backup_failed", "the database has no schema yet: run `xrayq migrate` first")
        return str(connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one())


def holds_rows(database_url: str) -> bool:
    """True when any table of the database has a row (a schema alone, as `xrayq migrate` leaves it, is empty)."""
    with _connection(database_url) as connection:
        tables = [name for name in inspect(connection).get_table_names() if name != "alembic_version"]
        return any(connection.execute(text(f'SELECT EXISTS (SELECT 1 FROM "{name}")')).scalar() for name in tables)


# --- Postgres


def _libpq(database_url: str) -> tuple[str, dict[str, str]]:
    """The SQLAlchemy URL as a libpq URL for pg_dump/pg_restore, its password in the environment (never
    on a command line that `ps` shows)."""
    url: URL = make_url(database_url)
    env = {**os.environ}
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    return url.set(drivername="postgresql", password=None).render_as_string(hide_password=False), env


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise XrayqError(
            "backup_tool_unavailable", f"{name} is not installed (Debian: apt-get install postgresql-client)"
        )
    return path


def _run(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise XrayqError("backup_failed", f"{Path(argv[0]).name} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def _tool_version(tool: str) -> tuple[str, int]:
    line = _run([tool, "--version"], dict(os.environ)).strip()
    found = re.search(r"\) (\d+)", line)
    if found is None:
        raise XrayqError("backup_tool_unavailable", f"cannot read the version of {tool}: {line!r}")
    return line, int(found.group(1))


def dump_postgres(database_url: str, target: Path) -> str:
    """`pg_dump --format=custom` of the whole database into `target`; returns pg_dump's version line."""
    tool = _tool("pg_dump")
    line, major = _tool_version(tool)
    with _connection(database_url) as connection:
        server = int(connection.execute(text("SHOW server_version_num")).scalar_one()) // 10000
    if major < server:  # pg_dump refuses a newer server; say which client to install instead
        raise XrayqError(
            "backup_tool_unavailable",
            f"{line} cannot dump a PostgreSQL {server} server: install postgresql-client-{server}",
        )
    url, env = _libpq(database_url)
    _run([tool, "--format=custom", "--no-owner", "--no-privileges", f"--file={target}", f"--dbname={url}"], env)
    return line


def clear_postgres(database_url: str) -> None:
    """Empties the target's schema (tables, types, sequences), so the dump recreates it exactly."""
    with _connection(database_url, isolation_level="AUTOCOMMIT") as connection:
        schema = connection.execute(text("SELECT current_schema()")).scalar_one()
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))


def restore_postgres(database_url: str, dump: Path) -> None:
    tool = _tool("pg_restore")
    url, env = _libpq(database_url)
    # One transaction: a restore that fails part-way leaves the target as empty as it found it.
    _run(
        [
            tool,
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
            f"--dbname={url}",
            str(dump),
        ],
        env,
    )


# --- SQLite (the embedded mode)


def sqlite_path(database_url: str) -> Path:
    database = make_url(database_url).database
    if not database or database == ":memory:":
        raise XrayqError("backup_failed", f"{database_url} is not a database file")
    return Path(database)


def dump_sqlite(database_url: str, target: Path) -> str:
    """SQLite's online backup: a consistent copy while gateway, worker and trainer keep writing."""
    source = sqlite3.connect(sqlite_path(database_url), timeout=30)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
    finally:
        copy.close()
        source.close()
    return f"SQLite {sqlite3.sqlite_version}"


def restore_sqlite(database_url: str, dump: Path) -> None:
    """Copies the backup's database over the target file page by page (what was there is replaced)."""
    path = sqlite_path(database_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(dump)
    target = sqlite3.connect(path, timeout=30)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
