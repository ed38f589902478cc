"""Liveness, readiness (database, broker, storage, active model) and Prometheus metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from services.gateway.access import GuardedRoute
from services.gateway.deps import AdminDep, CeleryDep, DatabaseDep, MetricsDep, SettingsDep, StoreDep
from shared.core.settings import Settings
from shared.core.storage import ObjectStore
from shared.db.session import Database
from shared.models.registry import any_active_version
from shared.schemas import ReadinessView

router = APIRouter(tags=["health"], route_class=GuardedRoute)
log = logging.getLogger(__name__)

# What /readyz says of a failed check: a fixed sentence. The exception's own text (driver messages
# with host names, ports, user names, paths) goes to the gateway's log only: /readyz answers anyone.
UNANSWERED = {
    "database": "the database did not answer",
    "broker": "the message broker did not answer",
    "storage": "the object store did not answer",
}


class NotReady(Exception):
    """A check's failure whose message is ours and safe to show."""


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadinessView, responses={503: {"model": ReadinessView}})
async def readyz(
    response: Response, settings: SettingsDep, database: DatabaseDep, store: StoreDep, celery: CeleryDep
) -> ReadinessView:
    """Everything a submission needs answers: database, broker, object storage, an active model."""
    checks = await run_in_threadpool(_run_checks, settings, database, store, celery)
    ready = all(check["ok"] for check in checks.values())
    if not ready:
        response.status_code = 503
    return ReadinessView(ready=ready, checks=checks)


def _run_checks(
    settings: Settings, database: Database, store: ObjectStore, celery: Celery
) -> dict[str, dict[str, Any]]:
    def database_answers() -> None:
        with database.session() as session:
            session.execute(text("SELECT 1"))

    def broker_answers() -> None:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    def active_model() -> None:
        with database.session() as session:
            if not any_active_version(session, settings.default_model):
                raise NotReady(f"no active version of {settings.default_model!r}")

    checks = {"database": database_answers, "broker": broker_answers, "storage": store.ping, "model": active_model}
    return {name: _timed(name, check) for name, check in checks.items()}


def _timed(name: str, check: Callable[[], None]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        check()
        result: dict[str, Any] = {"ok": True}
    except NotReady as exc:
        result = {"ok": False, "error": str(exc)}
    except Exception:
        log.warning("readiness check %s failed", name, exc_info=True)
        result = {"ok": False, "error": UNANSWERED.get(name, "the check failed")}
    result["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


def metrics_router(access: str) -> APIRouter:
    """`/metrics` as `XRAYQ_METRICS_ACCESS` says: open, for admin keys only, or not served at all."""
    metrics = APIRouter(tags=["health"], route_class=GuardedRoute)
    if access == "open":

        @metrics.get("/metrics", include_in_schema=False)
        def open_metrics(registry: MetricsDep) -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    elif access == "key":

        @metrics.get("/metrics", include_in_schema=False)
        def admin_metrics(registry: MetricsDep, _: AdminDep) -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
