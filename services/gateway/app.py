"""The HTTP gateway (`xrayq gateway`; uvicorn factory `services.gateway.app:create_app`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from services.gateway.access import Gatekeeper, PrincipalCache
from services.gateway.admission import AdmissionQueue
from services.gateway.browsers import BrowserGuard
from services.gateway.limits import BodySizeLimit
from services.gateway.metrics import HOUSEKEEPING_ACTIVE, RequestMetrics, StateCollector, WorkerCensus, scrape_registry
from services.gateway.printable_urls import PrintableUrls
from services.gateway.problems import install_problem_handlers
from services.gateway.request_log import RequestLog
from services.gateway.routes import (
    api_keys,
    audit_events,
    batches,
    callbacks,
    datasets,
    dicomweb,
    explanations,
    health,
    jobs,
    model_files,
    models,
    operations,
    sessions,
    sr_destinations,
    studies,
    training_runs,
)
from services.gateway.ui import pages
from services.gateway.waiter import CompletionWaiter
from shared.audit import purge_old_audit_events
from shared.core.logs import configure_logging
from shared.core.queue import make_celery
from shared.core.settings import Settings, get_settings
from shared.core.storage import make_object_store
from shared.core.tracing import configure_tracing
from shared.db.process_lock import ProcessLock, process_lock
from shared.db.session import database_for
from shared.jobs.deliveries import finish_pass
from shared.jobs.reconciler import SWEEP_EVERY_S, purge_old_inputs, reconcile_once, sweep_orphaned_inputs
from shared.training.reconciler import reconcile_runs

log = logging.getLogger(__name__)
HOUSEKEEPING_LOCK = "gateway-housekeeping"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings, "gateway")
    configure_tracing(settings, "gateway")  # before the database engine: its statements are traced
    app = FastAPI(
        lifespan=_lifespan,
        title="xrayq",
        version="1",
        summary="Asynchronous classification of medical images, with retrainable models.",
        description="Submit images as jobs, get ids at once, poll or long-poll for results.",
        # XRAYQ_API_DOCS=off: /docs, /redoc and /openapi.json are not served.
        docs_url="/docs" if settings.api_docs == "on" else None,
        redoc_url="/redoc" if settings.api_docs == "on" else None,
        openapi_url="/openapi.json" if settings.api_docs == "on" else None,
    )
    app.state.settings = settings
    app.state.database = database_for(settings)
    app.state.store = make_object_store(settings)
    app.state.celery = make_celery(settings, "xrayq-gateway")
    app.state.waiter = CompletionWaiter(
        app.state.database, max_waiters=settings.max_long_polls, read_threads=settings.long_poll_threads
    )
    app.state.principals = PrincipalCache(settings.auth_cache_s)
    app.state.gatekeeper = Gatekeeper(settings, app.state.principals, app.state.database)
    app.state.admission = AdmissionQueue(settings, app.state.database, app.state.store, app.state.celery)
    state = StateCollector(settings, app.state.database, WorkerCensus(app.state.celery))
    app.state.metrics = scrape_registry(settings, state)

    install_problem_handlers(app)
    routes = (
        jobs,
        explanations,
        batches,
        studies,
        callbacks,
        dicomweb,
        datasets,
        training_runs,
        models,
        model_files,
        api_keys,
        audit_events,
    )
    for module in (*routes, sr_destinations, sessions, operations, health, pages):
        app.include_router(module.router)
    app.include_router(health.metrics_router(settings.metrics_access))
    # Outermost last: request ids and the access log, metrics, CORS, the browser guard, the body cap
    # (keys are checked by `GuardedRoute`).
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_request_bytes,
        overrides={
            "/v1/datasets": settings.max_dataset_upload_bytes,
            "/v1/models/[^/]+/import": settings.max_weights_upload_bytes,
        },
    )
    app.add_middleware(BrowserGuard, settings=settings)
    app.add_middleware(PrintableUrls)
    origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
    if origins:  # restrictive by default: no cross-origin browser access unless configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        )
    app.add_middleware(RequestMetrics)
    app.add_middleware(RequestLog)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # Housekeeping and deliveries run on threads of their own: a slow pass (a PACS that trickles, a big
    # purge) then waits for its own pool, never for, or instead of, the one request handlers share.
    housekeeping = anyio.CapacityLimiter(settings.housekeeping_threads)
    # ...and in one gateway process at a time, among every process and replica on this database.
    lock = process_lock(app.state.database, HOUSEKEEPING_LOCK)
    tasks = [asyncio.create_task(_finish_batches_forever(app, lock, housekeeping))]
    if settings.reconcile_interval_s > 0:
        tasks.append(asyncio.create_task(_reconcile_forever(app, lock, housekeeping)))
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # a pass under way finishes first: the lock is never let go in the middle of one
    lock.release()
    HOUSEKEEPING_ACTIVE.set(0)


async def _holds(lock: ProcessLock, limiter: anyio.CapacityLimiter) -> bool:
    """Whether this process runs the housekeeping now. The holder keeps the lock while it lives; the
    others ask again at each pass, so one of them takes over within a pass of the holder's death."""
    held = await anyio.to_thread.run_sync(lock.hold, limiter=limiter)
    HOUSEKEEPING_ACTIVE.set(1 if held else 0)
    return held


async def _reconcile_forever(app: FastAPI, lock: ProcessLock, limiter: anyio.CapacityLimiter) -> None:
    state = app.state
    last_sweep = -SWEEP_EVERY_S  # the first pass sweeps
    while True:
        await asyncio.sleep(state.settings.reconcile_interval_s)
        try:
            if not await _holds(lock, limiter):
                continue
            queue = (state.settings, state.database, state.celery)
            await anyio.to_thread.run_sync(reconcile_once, *queue, limiter=limiter)
            await anyio.to_thread.run_sync(reconcile_runs, *queue, limiter=limiter)
            await anyio.to_thread.run_sync(purge_old_inputs, state.settings, state.database, limiter=limiter)
            if time.monotonic() - last_sweep >= SWEEP_EVERY_S:
                last_sweep = time.monotonic()
                sweep = (state.settings, state.database, state.store)
                await anyio.to_thread.run_sync(sweep_orphaned_inputs, *sweep, limiter=limiter)
            await anyio.to_thread.run_sync(purge_old_audit_events, state.settings, state.database, limiter=limiter)
        except Exception:
            log.exception("housekeeping pass failed")


async def _finish_batches_forever(app: FastAPI, lock: ProcessLock, limiter: anyio.CapacityLimiter) -> None:
    """Seal stable studies, make their reports, send results out: a study's stability timeout is short,
    so this runs on its own, quicker interval."""
    state = app.state
    while True:
        await asyncio.sleep(state.settings.study_check_interval_s)
        try:
            if not await _holds(lock, limiter):
                continue
            await anyio.to_thread.run_sync(finish_pass, state.settings, state.database, state.store, limiter=limiter)
        except Exception:
            log.exception("finishing batches failed")
