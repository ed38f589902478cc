"""Optional OpenTelemetry traces: gateway -> broker -> worker, off unless `XRAYQ_OTEL_ENDPOINT` is set.

When set, each process sends its spans by OTLP over HTTP to that collector, named `xrayq-<service>`:
FastAPI traces each request by itself once a tracer provider is configured (its native telemetry);
the Celery instrumentation puts the trace context into each message's headers and continues it in
the worker; SQLAlchemy's and botocore's show the database statements and object-store calls inside.
The packages are the optional extra `otel` (`pip install 'xrayq[otel]'`); asked for without them, a
process refuses to start rather than run untraced unnoticed.
"""

from __future__ import annotations

import logging

from shared.core.settings import Settings

log = logging.getLogger(__name__)
_configured: set[str] = set()  # one provider per process; tests build several apps in one process


class TracingUnavailable(RuntimeError):
    pass


def configure_tracing(settings: Settings, service: str) -> bool:
    """Install the tracer provider and instrumentations when an endpoint is set; whether traces flow.

    Call in the process that does the work, before it creates its database engine: a Celery worker's
    pool process (after the fork: the exporter's thread does not survive one), the gateway's app."""
    if not settings.otel_endpoint:
        return False
    if _configured:
        return True
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            f"XRAYQ_OTEL_ENDPOINT is set but OpenTelemetry is not installed ({exc.name}): "
            "install the extra with `pip install 'xrayq[otel]'`, or unset XRAYQ_OTEL_ENDPOINT."
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": f"xrayq-{service}"}))
    endpoint = settings.otel_endpoint.rstrip("/") + "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()
    SQLAlchemyInstrumentor().instrument()
    BotocoreInstrumentor().instrument()
    _configured.add(service)
    log.info("sending traces to %s", endpoint)
    return True
