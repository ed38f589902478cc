"""A throw-away Postgres cluster of our own, so that a fault test can really restart it (crash-style)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

from loadtest.harness.processes import free_port


class PrivatePostgres:
    """initdb + pg_ctl as the postgres user, on a free loopback port, under `workdir/postgres`."""

    def __init__(self, workdir: Path) -> None:
        self.bindir = self.find_bindir()
        self.dir = workdir / "postgres"
        self.port = free_port()
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def find_bindir() -> Path | None:
        """The newest installed server's binaries, or None where a private cluster is impossible
        (no server binaries, or no `runuser` to become the postgres user)."""
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
        return candidates[0].parent if candidates and shutil.which("runuser") else None

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=60)

    def _pg_ctl(self, *args: str) -> None:
        assert self.bindir is not None
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), *args)

    def _server_options(self) -> list[str]:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        return ["-o", options, "-l", str(self.dir / "log")]

    def start(self) -> None:
        assert self.bindir is not None
        self.dir.parent.chmod(0o755)  # mkdtemp's 0700 would keep the postgres user out
        self.dir.mkdir(parents=True)
        shutil.chown(self.dir, "postgres")
        self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")
        self._pg_ctl(*self._server_options(), "-w", "start")

    def restart(self) -> None:
        # "immediate": like a crash (no clean shutdown, WAL recovery on start).
        self._pg_ctl("-m", "immediate", *self._server_options(), "-w", "restart")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._pg_ctl("-m", "immediate", "stop")
