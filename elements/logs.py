"""Log setup for the proxy and every SDK element: structured fields, console or JSON.

Call sites pass fields as `extra={"fields": {...}}`; the console formatter appends
them as key=value, the JSON formatter merges them into the object, so switching
LOG_FORMAT never changes what is logged. It lives in the elements package, which
never imports the proxy, so an element and the proxy print the same lines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


def fields(**values: Any) -> dict[str, Any]:
    """`log.info("...", extra=fields(conn=..., bytes=...))` attaches structured fields."""
    return {"fields": values}


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower():<7} {record.name}: {record.getMessage()}"
        extra = getattr(record, "fields", None)
        if extra:
            line += " " + " ".join(f"{key}={value}" for key, value in extra.items() if value is not None)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in (getattr(record, "fields", None) or {}).items() if v is not None})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for LOG_FORMAT `console` or `json`."""
    return JsonFormatter() if log_format == "json" else ConsoleFormatter()


def setup(level: str, log_format: str) -> None:
    """Configures the root logger once per process (each proxy worker, each element calls it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(max(logging.WARNING, root.level))
