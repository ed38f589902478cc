"""Prometheus metrics of the gateway, plus state read at scrape time.

Job counts, active versions and queue depths come from the database and the broker (the sources of
truth), so they are right however many gateway and worker processes there are. The worker's own
timings are served by each `xrayq worker` (see services/worker/metrics.py).

With several gateway processes (`XRAYQ_GATEWAY_PROCESSES`), prometheus_client's multiprocess mode
is on: each process writes its counters and histograms to files in `PROMETHEUS_MULTIPROC_DIR`, and
whichever process answers a scrape serves their sum (`scrape_registry`). A gauge states how it sums
across processes (`multiprocess_mode`); `liveall` keeps one sample per live process, with a `pid`
label, and forgets a process once it has died (`xrayq gateway` marks it dead).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator

from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.core.queue import queue_depths
from shared.core.settings import Settings
from shared.db.models import Batch, Job, ModelVersion, TrainingRun
from shared.db.session import Database
from shared.jobs.dispatch import DELIVERY_ATTEMPTS

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

JOBS_SUBMITTED = Counter("xrayq_jobs_submitted", "Jobs accepted by the gateway", ["model", "kind"], registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "xrayq_http_requests", "HTTP requests handled", ["method", "route", "status"], registry=REGISTRY
)
# Every problem the gateway answers, by its stable code: what failed, not only how many (the status).
HTTP_ERRORS = Counter(
    "xrayq_http_errors", "Problems (error answers) sent, by code and status", ["code", "status"], registry=REGISTRY
)
# Counted where deliveries are made (`shared.jobs.dispatch`, in this process); served here.
REGISTRY.register(DELIVERY_ATTEMPTS)
HTTP_LATENCY = Histogram(
    "xrayq_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
# Per process (a `pid` label with several processes): how requests spread, and which process runs the
# reconciler and deliveries (the sum is 1 while the gateway works; see shared/db/process_lock.py).
PROCESS_REQUESTS = Gauge(
    "xrayq_gateway_process_requests",
    "HTTP requests answered by this gateway process since it started",
    multiprocess_mode="liveall",
    registry=REGISTRY,
)
HOUSEKEEPING_ACTIVE = Gauge(
    "xrayq_gateway_housekeeping_active",
    "1 in the gateway process that runs the reconciler and deliveries, else 0",
    multiprocess_mode="liveall",
    registry=REGISTRY,
)
_state_collectors: list[Collector] = []


def scrape_registry(settings: Settings, state: Collector) -> CollectorRegistry:
    """What `/metrics` and the Operations page read: the metrics above (this process's, or with
    several processes the sum of all of theirs, read from their files) plus `state`, read at scrape time."""
    if settings.prometheus_multiproc_dir is None:
        # The module's registry is process-wide, and tests build several apps in one process.
        while _state_collectors:
            REGISTRY.unregister(_state_collectors.pop())
        REGISTRY.register(state)
        _state_collectors.append(state)
        return REGISTRY
    registry = CollectorRegistry(auto_describe=True)
    MultiProcessCollector(registry, path=str(settings.prometheus_multiproc_dir))
    registry.register(state)
    return registry


class WorkerCensus:
    """The worker and trainer processes that answer a broadcast ping, by the queue they consume.

    Each `xrayq worker` and `xrayq trainer` is a Celery worker named `<queue>-<pid>@<host>`. A ping
    waits its whole timeout for replies, so an answer is kept for `max_age_s`: scrapes and the
    dashboard's polls then cost a ping every few seconds at most, not one each."""

    def __init__(self, celery: Celery, timeout_s: float = 0.5, max_age_s: float = 10.0) -> None:
        self.celery = celery
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._counted: tuple[float, dict[str, int]] | None = None

    def counts(self) -> dict[str, int]:
        with self._lock:
            if self._counted is None or time.monotonic() - self._counted[0] > self.max_age_s:
                replies = self.celery.control.ping(timeout=self.timeout_s) or []
                names = [name for reply in replies for name in reply]
                self._counted = (time.monotonic(), dict(Tally(name.split("@")[0].rsplit("-", 1)[0] for name in names)))
            return self._counted[1]


class StateCollector(Collector):
    """Read at scrape time from the sources of truth: jobs and training runs by status, active
    versions, batches with deliveries pending, queue depths, and the workers that answer."""

    def __init__(self, settings: Settings, database: Database, workers: WorkerCensus) -> None:
        self.settings = settings
        self.database = database
        self.workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("xrayq_jobs", "Jobs in the database by status and model", labels=["status", "model"])
        active = GaugeMetricFamily(
            "xrayq_model_active_info", "The active version of each model", labels=["model", "version", "architecture"]
        )
        depth = GaugeMetricFamily("xrayq_queue_depth", "Messages waiting in the broker", labels=["queue"])
        workers = GaugeMetricFamily("xrayq_workers", "Worker processes answering a ping, by queue", labels=["queue"])
        runs = GaugeMetricFamily("xrayq_training_runs", "Training runs in the database by status", labels=["status"])
        pending = GaugeMetricFamily("xrayq_deliveries_pending", "Completed batches with a delivery still to make")
        try:
            with self.database.session() as session:
                rows = session.execute(
                    select(Job.status, Job.model_name, func.count()).group_by(Job.status, Job.model_name)
                ).all()
                versions = session.execute(
                    select(ModelVersion.name, ModelVersion.version, ModelVersion.architecture).where(
                        ModelVersion.is_active.is_(True)
                    )
                ).all()
                run_counts = session.execute(
                    select(TrainingRun.status, func.count()).group_by(TrainingRun.status)
                ).all()
                # `delivery_due_at` is set while any delivery (SR, callback) of the batch is pending.
                pending_count = session.scalar(
                    select(func.count()).select_from(Batch).where(Batch.delivery_due_at.is_not(None))
                )
            for status, model, count in rows:
                jobs.add_metric([status.value, model], count)
            for name, version, architecture in versions:
                active.add_metric([name, str(version), architecture], 1)
            for status, count in run_counts:
                runs.add_metric([status.value], count)
            pending.add_metric([], pending_count or 0)
        except Exception:  # a scrape must not fail because the database hiccuped
            log.warning("could not read job counts for /metrics", exc_info=True)
        try:
            for queue, count in queue_depths(self.settings).items():
                depth.add_metric([queue], count)
        except Exception:
            log.warning("could not read queue depths for /metrics", exc_info=True)
        try:
            for queue, count in self.workers.counts().items():
                workers.add_metric([queue], count)
        except Exception:
            log.warning("could not ping the workers for /metrics", exc_info=True)
        yield from (jobs, active, depth, workers, runs, pending)


class RequestMetrics:
    """Counts and times requests by route template (not raw path: ids would explode the label set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], template, str(status)).inc()
            HTTP_LATENCY.labels(scope["method"], template).observe(time.perf_counter() - started)
            PROCESS_REQUESTS.inc()
