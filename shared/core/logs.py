"""Logging setup: JSON lines in services mode, plain text at a terminal. Never log image bytes."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from shared.core.settings import Settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    # sys.__stderr__, not sys.stderr: in a Celery pool process sys.stderr is Celery's LoggingProxy,
    # which feeds records back into logging and drops them (recursion guard).
    handler = logging.StreamHandler(sys.__stderr__)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
