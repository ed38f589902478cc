"""The request id and organisation travel with each Celery message, from the gateway to the worker's
and trainer's log lines: one grep follows an image from its request to its result.

The publisher's log context (`shared.core.log_context`) goes into the message's headers; the
worker binds them, with the task's name, for as long as the task runs. Connected once, on import, by
`shared.core.queue` (Celery's signals are process-wide).
"""

from __future__ import annotations

from contextvars import Token
from typing import Any

from celery.signals import before_task_publish, task_postrun, task_prerun

from shared.core import log_context

# Message headers: what the publisher was doing when it published.
REQUEST_ID_HEADER = "xrayq_request_id"
ORGANISATION_HEADER = "xrayq_organisation"
_CARRIED = {REQUEST_ID_HEADER: "request_id", ORGANISATION_HEADER: "organisation"}

_tokens: dict[str, Token[Any]] = {}  # per task id, from prerun to postrun


@before_task_publish.connect(weak=False)
def _carry_context(headers: dict[str, Any] | None = None, **_: object) -> None:
    if headers is None:
        return
    context = log_context.current()
    for header, field in _CARRIED.items():
        if field in context:
            headers.setdefault(header, context[field])


@task_prerun.connect(weak=False)
def _bind_context(task_id: str | None = None, task: Any = None, **_: object) -> None:
    if task is None or task_id is None:
        return
    request = task.request
    fields = {field: _text(request.get(header)) for header, field in _CARRIED.items()}
    _tokens[task_id] = log_context.bind(task=task.name, **fields)


@task_postrun.connect(weak=False)
def _unbind_context(task_id: str | None = None, **_: object) -> None:
    token = _tokens.pop(task_id or "", None)
    if token is not None:
        log_context.reset(token)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
