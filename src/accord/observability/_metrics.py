"""Prometheus metrics of consumers (the relay defines its own).

All metrics live in prometheus-client's default registry, labelled by consumer
name, so one ``/metrics`` endpoint (:func:`start_metrics_server`) shows every
consumer of the process.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

__all__ = [
    "CONSUMER_DEAD_LETTERED",
    "CONSUMER_DUPLICATES",
    "CONSUMER_FAILED",
    "CONSUMER_HANDLED",
    "CONSUMER_HANDLE_SECONDS",
    "start_metrics_server",
]

CONSUMER_HANDLED = Counter(
    "accord_consumer_handled",
    "Messages whose handler committed, per consumer and message type.",
    ["consumer", "type"],
)
CONSUMER_FAILED = Counter(
    "accord_consumer_failed",
    "Handler attempts that raised and were rolled back (each retry counts).",
    ["consumer", "type"],
)
CONSUMER_DEAD_LETTERED = Counter(
    "accord_consumer_dead_lettered",
    "Messages written to accord_dead_letters, per consumer and kind "
    "(undecodable, unknown_type, invalid_data, handler_failed, delivery_limit).",
    ["consumer", "kind"],
)
CONSUMER_DUPLICATES = Counter(
    "accord_consumer_duplicates",
    "Deliveries skipped because the inbox already held their message id.",
    ["consumer", "type"],
)
CONSUMER_HANDLE_SECONDS = Histogram(
    "accord_consumer_handle_seconds",
    "Time to handle one delivery, inbox write and commit included.",
    ["consumer", "type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` for Prometheus on ``addr:port`` from a background thread."""
    start_http_server(port, addr=addr)
