"""Prometheus metrics of sagas and flows (prometheus-client's default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["FLOWS_STALLED", "SAGAS_ENDED", "SAGAS_STARTED", "SAGAS_STUCK", "SAGA_DURATION"]

SAGAS_STARTED = Counter("accord_sagas_started", "Saga instances started.", ["saga"])
SAGAS_ENDED = Counter(
    "accord_sagas_ended",
    "Saga instances that ended, per saga and status (COMPLETED, COMPENSATED, ABORTED).",
    ["saga", "status"],
)
SAGAS_STUCK = Counter(
    "accord_sagas_stuck",
    "Times a saga became STUCK (a compensation or retriable step past its retry limit); "
    "each waits for an operator (accord sagas list --status STUCK).",
    ["saga"],
)
SAGA_DURATION = Histogram(
    "accord_saga_duration_seconds",
    "Time from start to end of a saga, per saga and final status.",
    ["saga", "status"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
FLOWS_STALLED = Gauge(
    "accord_flows_stalled",
    "Flows (correlation ids) without progress for longer than the tracker's stalled_after.",
    ["tracker"],
)
