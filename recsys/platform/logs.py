"""How long-running processes log: text for people, or one JSON object a line for a log collector.

`RECSYS_LOG_FORMAT=json` switches the command line, the worker (Celery's handlers) and gunicorn
(its error and access logs, and the app's loggers through the root logger) to `JsonFormatter`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from recsys.config import Settings

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """time (UTC, ISO 8601), level, logger, message, process, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def formatter(settings: Settings, text_format: str = TEXT_FORMAT) -> logging.Formatter:
    return JsonFormatter() if settings.log_format == "json" else logging.Formatter(text_format)


def use_format(handlers, settings: Settings) -> None:
    """Give these handlers the configured format (leaves them alone for `text`, whose layout the
    caller chose)."""
    if settings.log_format != "json":
        return
    for handler in handlers:
        handler.setFormatter(JsonFormatter())


def gunicorn_logconfig(settings: Settings) -> dict | None:
    """gunicorn's `logconfig_dict` for JSON logs (None keeps gunicorn's own text layout)."""
    if settings.log_format != "json":
        return None
    level = settings.log_level.upper()
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "recsys.platform.logs.JsonFormatter"}},
        "handlers": {"stderr": handler, "stdout": {**handler, "stream": "ext://sys.stdout"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
        },
    }
