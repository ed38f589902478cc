"""Logging setup: JSON lines in services mode, plain text at a terminal. Never log image bytes.

A JSON line holds the time, level, logger, message and the process's `service`, then the fields of
the work in progress (`shared.core.log_context`: request, job, batch, run, organisation) and those a
call passes in `extra` -- only the names `log_context` lists, so no line grows a field of data.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from shared.core import log_context
from shared.core.settings import Settings

_EXTRA_FIELDS = frozenset(log_context.EXTRA_FIELDS) | frozenset(log_context.FIELDS)
_CONTEXT_ATTRIBUTE = "xrayq_context"


def _context_of(record: logging.LogRecord) -> dict[str, str]:
    return getattr(record, _CONTEXT_ATTRIBUTE, None) or {}


def _stamp_context(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """Records take the context where they are made: a handler may format them later, elsewhere."""
    if getattr(factory, "stamps_context", False):
        return factory

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        setattr(record, _CONTEXT_ATTRIBUTE, log_context.current())
        return record

    make_record.stamps_context = True  # type: ignore[attr-defined]
    return make_record


logging.setLogRecordFactory(_stamp_context(logging.getLogRecordFactory()))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.service:
            entry["service"] = self.service
        entry.update(_context_of(record))
        entry.update(
            {name: value for name, value in vars(record).items() if name in _EXTRA_FIELDS and value is not None}
        )
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The terminal's format, with the request and job ids after the message when there are some."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # before the traceback, if any
        line = super().formatMessage(record)
        context = _context_of(record)
        return f"{line} [{' '.join(f'{k}={v}' for k, v in context.items())}]" if context else line


def configure_logging(settings: Settings, service: str = "") -> None:
    """Send every record to stderr in `settings.log_format`; `service` names the process in JSON lines."""
    # sys.__stderr__, not sys.stderr: in a Celery pool process sys.stderr is Celery's LoggingProxy,
    # which feeds records back into logging and drops them (recursion guard).
    handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(JsonFormatter(service) if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
