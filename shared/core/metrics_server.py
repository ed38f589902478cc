"""The Prometheus endpoint of a process that is not the gateway: `xrayq worker`, `trainer`, `dicom`.

The worker and trainer are Celery pools: their metrics are counted in the pool's child processes, so
every process writes its samples to a folder of its own (prometheus_client's multiprocess mode) and the
main process serves their sum. The DICOM receiver is one process, served the same way: one path.
The folder must be named before anything imports prometheus_client, which reads it at import, hence
the lazy imports and `serve_process_metrics` being called first thing by each command.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile


def serve_process_metrics(port: int, role: str) -> None:
    """Serve this process tree's metrics on `port` (all interfaces: Prometheus scrapes it from afar).

    A port already taken (two workers on one host) is reported and the process goes on without an
    endpoint of its own: its work matters more than its metrics.
    """
    if not port:
        return
    folder = tempfile.mkdtemp(prefix=f"xrayq-{role}-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # before anything imports prometheus_client
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    try:
        start_http_server(port, addr="0.0.0.0", registry=registry)
    except OSError as exc:
        print(f"xrayq {role}: metrics not served on port {port}: {exc}", file=sys.stderr, flush=True)
