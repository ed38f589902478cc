"""`xrayq gateway` with `XRAYQ_GATEWAY_PROCESSES` > 1: several uvicorn processes on one socket.

uvicorn's own supervisor binds the socket once, starts the processes (each builds the app from the
factory below) and starts a new one when one dies; this adds what the metrics need. Every start gets a
fresh, empty `PROMETHEUS_MULTIPROC_DIR` (set before any process imports prometheus_client), so no
sample of an earlier run is summed in, and the folder goes when the gateway stops. A process that dies
is marked dead there, so its per-process gauges (`liveall`) disappear from /metrics while its counts
stay in the sums (a counter never goes backwards because a process died).

What else must hold with several processes (and replicas), and where it is kept: long-polls are
answered from the database (services/gateway/waiter.py), whichever process wrote the result; the
reconciler and deliveries run in one process at a time (shared/db/process_lock.py); request limits
are counted in Redis (services/gateway/throttle.py; per process in embedded mode).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from uvicorn import Config
from uvicorn.supervisors.multiprocess import Multiprocess

from services.cli.supervisor import die_with_parent
from shared.core.settings import Settings

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's name, read at its import


def run_gateway_processes(settings: Settings, **uvicorn_options: Any) -> None:
    """Serve on `settings.host:port` with `settings.gateway_processes` processes until SIGTERM/SIGINT."""
    metrics_dir = Path(tempfile.mkdtemp(prefix="xrayq-gateway-metrics-"))
    os.environ[MULTIPROC_DIR_VARIABLE] = str(metrics_dir)  # inherited by the processes spawned below
    config = Config(
        "services.cli.gateway_processes:gateway_process_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.gateway_processes,
        # A process that does not answer the supervisor's ping this long is killed and replaced: long
        # enough that a busy machine's scheduling never passes for a hang.
        timeout_worker_healthcheck=30,
        **uvicorn_options,
    )
    listener = config.bind_socket()
    try:
        GatewayProcesses(config, [listener], metrics_dir).run()
    finally:
        listener.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def gateway_process_app() -> FastAPI:
    """The app of one gateway process (uvicorn's factory, called in the process). The process ends
    with its parent, even one killed with -9: an orphan would go on serving the socket unsupervised."""
    from services.gateway.app import create_app

    die_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died while this one was starting
        raise SystemExit(1)
    return create_app()


class GatewayProcesses(Multiprocess):
    """uvicorn's supervisor, which also tells prometheus_client which processes are gone: those that
    died and were replaced, and those it retired itself (SIGHUP restarts, SIGTTOU)."""

    def __init__(self, config: Config, sockets: list[socket.socket], metrics_dir: Path) -> None:
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()  # replaces each process that died (or hangs) with a new one
        self.forget_dead_processes()

    def forget_dead_processes(self) -> None:
        from prometheus_client import multiprocess

        live = {process.pid for process in self.processes}
        for path in self.metrics_dir.glob("gauge_live*.db"):  # gauge_liveall_<pid>.db, gauge_livesum_<pid>.db
            pid = int(path.stem.rsplit("_", 1)[1])
            if pid not in live:
                multiprocess.mark_process_dead(pid, str(self.metrics_dir))
