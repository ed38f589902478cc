"""The HTTP gateway (`xrayq gateway`; uvicorn factory `services.gateway.app:create_app`)."""

from __future__ import annotations

from fastapi import FastAPI

from services.gateway.limits import BodySizeLimit
from services.gateway.metrics import REGISTRY, JobStateCollector, RequestMetrics
from services.gateway.problems import install_problem_handlers
from services.gateway.routes import batches, health, jobs, models
from services.gateway.waiter import CompletionWaiter
from shared.db.session import database_for
from shared.logs import configure_logging
from shared.queue import make_celery
from shared.settings import Settings, get_settings
from shared.storage import make_object_store

_collectors: dict[str, JobStateCollector] = {}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)
    app = FastAPI(
        title="xrayq",
        version="1",
        summary="Asynchronous classification of medical images, with retrainable models.",
        description="Submit images as jobs, get ids at once, poll or long-poll for results.",
    )
    app.state.settings = settings
    app.state.database = database_for(settings)
    app.state.store = make_object_store(settings)
    app.state.celery = make_celery(settings, "xrayq-gateway")
    app.state.waiter = CompletionWaiter(app.state.database)
    _register_job_collector(settings, app.state.database)

    install_problem_handlers(app)
    for module in (jobs, batches, models, health):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMetrics)
    return app


def _register_job_collector(settings: Settings, database) -> None:  # type: ignore[no-untyped-def]
    # The registry is process-wide; tests build several apps in one process.
    previous = _collectors.pop("jobs", None)
    if previous is not None:
        REGISTRY.unregister(previous)
    _collectors["jobs"] = JobStateCollector(database)
    REGISTRY.register(_collectors["jobs"])
