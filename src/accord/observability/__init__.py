"""Observability: structured logs with message context, Prometheus metrics, tracing."""

from accord.observability._logging import (
    ContextFilter,
    JsonFormatter,
    configure_logging,
    current_log_context,
    log_context,
)
from accord.observability._metrics import (
    CONSUMER_DEAD_LETTERED,
    CONSUMER_DUPLICATES,
    CONSUMER_FAILED,
    CONSUMER_HANDLE_SECONDS,
    CONSUMER_HANDLED,
    start_metrics_server,
)
from accord.observability._tracing import (
    BatchSpans,
    as_current,
    batch_spans,
    consumer_span,
    current_traceparent,
    traceparent_of,
)

__all__ = [
    "CONSUMER_DEAD_LETTERED",
    "CONSUMER_DUPLICATES",
    "CONSUMER_FAILED",
    "CONSUMER_HANDLED",
    "CONSUMER_HANDLE_SECONDS",
    "BatchSpans",
    "ContextFilter",
    "JsonFormatter",
    "as_current",
    "batch_spans",
    "configure_logging",
    "consumer_span",
    "current_log_context",
    "current_traceparent",
    "log_context",
    "start_metrics_server",
    "traceparent_of",
]
