"""What a log line is about: the request, job, batch, run and organisation of the work in progress.

Held in a context variable, so every line logged while a request is handled (or a message is worked
on) carries them without being passed around: asyncio tasks and `anyio.to_thread` copy the context,
and Celery messages carry the request id to the worker (see `shared.core.message_context`).

Only the names in `FIELDS` exist: a log line can never grow a field that holds image bytes or a
patient's name, whatever a caller binds.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator, Mapping
from contextvars import Context, ContextVar, Token
from types import MappingProxyType

# The context's fields, and the extra fields a log call may pass (`log.info(..., extra={...})`).
FIELDS = ("request_id", "job_id", "batch_id", "run_id", "organisation", "key_id", "task")
EXTRA_FIELDS = (
    "job_ids",
    "model",
    "version",
    "status",
    "code",
    "duration_ms",
    "method",
    "route",
    "client",
    "jobs",
)

_NOTHING: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("xrayq_log_context", default=_NOTHING)

# A request id a client may choose: short and printable, so it cannot forge log lines or carry data.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def current() -> dict[str, str]:
    return dict(_context.get())


def field_in(context: Context, name: str) -> str | None:
    """A field of another context (e.g. a request's, copied for a thread that works for it)."""
    return context.get(_context, _NOTHING).get(name)


def bind(**fields: str | None) -> Token[Mapping[str, str]]:
    """Add fields (None: leave out) to the context until `reset` with the token returned."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"not a log context field: {sorted(unknown)}")
    return _context.set({**_context.get(), **{name: value for name, value in fields.items() if value is not None}})


def reset(token: Token[Mapping[str, str]]) -> None:
    _context.reset(token)


@contextlib.contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Add fields to every line logged inside the block."""
    token = bind(**fields)
    try:
        yield
    finally:
        reset(token)


def request_id_from(header: str | None) -> str:
    """The client's `X-Request-ID` when it is a plain token, else a new one."""
    if header and _CLIENT_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex
