"""OpenTelemetry spans around handlers, continuing the trace of the message.

Only the OpenTelemetry *API* is used: without an SDK configured by the
application the spans are no-ops, yet the ``traceparent`` still flows from the
handled message to the messages its handler publishes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from accord.messages import Message

__all__ = ["consumer_span", "current_traceparent"]

_propagator = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("accord")


@contextlib.contextmanager
def consumer_span(consumer: str, message: Message) -> Iterator[Span]:
    """A CONSUMER span named ``"<type> process"``, child of the message's ``traceparent``
    (a new trace if it has none). An exception escaping the block is recorded on it."""
    carrier = {"traceparent": message.traceparent} if message.traceparent else {}
    parent = _propagator.extract(carrier)
    with _tracer.start_as_current_span(
        f"{message.type} process",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.operation": "process",
            "messaging.consumer.group.name": consumer,
            "messaging.message.id": message.id,
            "messaging.message.conversation_id": message.correlationid or message.id,
            "cloudevents.event_type": message.type,
            "cloudevents.event_source": message.source,
        },
        record_exception=True,
        set_status_on_exception=True,
    ) as span:
        yield span


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, or ``None`` outside any valid span."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")
