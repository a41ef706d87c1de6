"""Structured logs that carry the message being handled.

The consumer sets a *log context* (consumer, message id, correlation id, type)
in a :mod:`contextvars` variable around each handler call, so every log record
emitted while handling a message — by Accord or by the user's handler, with a
plain ``logging.getLogger(...)`` — carries those fields.
:class:`JsonFormatter` renders records as one JSON object per line.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "ContextFilter",
    "JsonFormatter",
    "configure_logging",
    "current_log_context",
    "log_context",
]

_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "accord_log_context", default=None
)


def _fields() -> Mapping[str, Any]:
    return _context.get() or {}


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def current_log_context() -> dict[str, Any]:
    """The fields the current task's log records are given (a copy)."""
    return dict(_fields())


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every log record emitted inside the ``with`` block (this task
    and tasks it starts). ``None`` values are left out; nesting merges."""
    merged = {**_fields(), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the current log context onto each record as attributes (``record.message_id``
    ...), so any formatter can use them, e.g. ``%(correlation_id)s``."""

    def __init__(self, defaults: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.defaults = dict(defaults or {})

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in {**self.defaults, **_fields()}.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the log context
    (service, consumer, message_id, correlation_id, ...), ``extra=`` fields, and the
    exception with its traceback when there is one."""

    def __init__(self, static: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(self.static)
        entry.update(_fields())
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(
    level: str | int = "INFO", *, json_logs: bool = True, service: str | None = None
) -> None:
    """Send logs to stderr, as JSON lines (``json_logs=True``) or readable text, each
    record carrying the log context. Replaces handlers on the root logger."""
    handler = logging.StreamHandler(sys.stderr)
    static = {"service": service} if service else {}
    if json_logs:
        handler.setFormatter(JsonFormatter(static))
    else:
        handler.addFilter(ContextFilter({"correlation_id": "-", "message_id": "-"}))
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s %(message_id)s] %(message)s"
            )
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
