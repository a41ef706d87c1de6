"""Observability: structured logs with message context, Prometheus metrics, tracing.

The metrics themselves are registered with prometheus-client's default registry
(``accord_*``; ``start_metrics_server`` serves them); the spans Accord makes go to
the OpenTelemetry tracer provider you configure.
"""

from accord.observability._logging import (
    ContextFilter,
    JsonFormatter,
    configure_logging,
    current_log_context,
    log_context,
)
from accord.observability._metrics import start_metrics_server
from accord.observability._tracing import current_traceparent, traceparent_of

__all__ = [
    "ContextFilter",
    "JsonFormatter",
    "configure_logging",
    "current_log_context",
    "current_traceparent",
    "log_context",
    "start_metrics_server",
    "traceparent_of",
]
