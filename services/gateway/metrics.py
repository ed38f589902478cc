"""Prometheus metrics of the gateway, plus job counts read from the database at scrape time.

Job counts come from the database (the source of truth), so they are right however many worker
processes there are, with no multi-process metric files to share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.db.models import Job
from shared.db.session import Database

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

JOBS_SUBMITTED = Counter("xrayq_jobs_submitted", "Jobs accepted by the gateway", ["model", "kind"], registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "xrayq_http_requests", "HTTP requests handled", ["method", "route", "status"], registry=REGISTRY
)
HTTP_LATENCY = Histogram(
    "xrayq_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)


class JobStateCollector(Collector):
    def __init__(self, database: Database) -> None:
        self.database = database

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("xrayq_jobs", "Jobs in the database by status and model", labels=["status", "model"])
        try:
            with self.database.session() as session:
                rows = session.execute(
                    select(Job.status, Job.model_name, func.count()).group_by(Job.status, Job.model_name)
                ).all()
            for status, model, count in rows:
                gauge.add_metric([status.value, model], count)
        except Exception:  # a scrape must not fail because the database hiccuped
            log.warning("could not count jobs for /metrics", exc_info=True)
        yield gauge


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
