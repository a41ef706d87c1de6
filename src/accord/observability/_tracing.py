"""OpenTelemetry spans around handlers, continuing the trace of the message.

Only the OpenTelemetry *API* is used: without an SDK configured by the
application the spans are no-ops, yet the ``traceparent`` still flows from the
handled message to the messages its handler publishes.

Every message handled gets its own CONSUMER span, child of its ``traceparent``:
around its handler (:func:`consumer_span`), or, when a batch of messages is
applied in one transaction, for as long as that transaction (:func:`batch_spans`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NoOpTracerProvider,
    ProxyTracer,
    ProxyTracerProvider,
    Span,
    SpanKind,
    Status,
    StatusCode,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from accord.messages import Message

__all__ = [
    "BatchSpans",
    "as_current",
    "batch_spans",
    "consumer_span",
    "current_traceparent",
    "traceparent_of",
]

_propagator = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("accord")


def _start(consumer: str, message: Message) -> Span:
    carrier = {"traceparent": message.traceparent} if message.traceparent else {}
    return _tracer.start_span(
        f"{message.type} process",
        context=_propagator.extract(carrier),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.operation": "process",
            "messaging.consumer.group.name": consumer,
            "messaging.message.id": message.id,
            "messaging.message.conversation_id": message.correlationid or message.id,
            "cloudevents.event_type": message.type,
            "cloudevents.event_source": message.source,
        },
    )


@contextlib.contextmanager
def consumer_span(consumer: str, message: Message) -> Iterator[Span]:
    """A CONSUMER span named ``"<type> process"``, child of the message's ``traceparent``
    (a new trace if it has none), current in the block. An exception escaping the
    block is recorded on it."""
    with trace.use_span(_start(consumer, message), end_on_exit=True) as span:
        yield span


class BatchSpans:
    """The spans of the messages of one batch transaction (see :func:`batch_spans`)."""

    def __init__(self, consumer: str, batch: Span, live: bool) -> None:
        self.consumer = consumer
        self.batch = batch
        self.live = live
        self.started: list[Span] = []

    def start(self, message: Message) -> Span | None:
        """Start ``message``'s span (as :func:`consumer_span` makes it), neither current
        nor ended: it ends with the batch's transaction. ``None`` while no tracer
        provider is configured: the span would be a no-op, and what the message's
        handling emits gets the message's own traceparent all the same."""
        if not self.live:
            return None
        span = _start(self.consumer, message)
        self.started.append(span)
        if self.batch.is_recording():
            self.batch.add_link(span.get_span_context())
        return span

    def current(
        self, message: Message, span: Span | None
    ) -> contextlib.AbstractContextManager[Any]:
        """Make ``span``, from :meth:`start`, current in the block. Without one, a no-op
        span of the message's traceparent, as :func:`consumer_span` has: what the block
        calls still propagates the message's trace."""
        if span is None:
            return consumer_span(self.consumer, message)
        return as_current(span)


@contextlib.contextmanager
def batch_spans(consumer: str, size: int) -> Iterator[BatchSpans]:
    """Trace a batch of ``size`` deliveries applied in one transaction: the block.

    A CONSUMER span ``"<consumer> process"`` (a new trace) is current in the block and
    links to the span of every message given one with :meth:`BatchSpans.start`. These
    spans all end when the block does; an exception escaping it is recorded on each,
    since the transaction of every message failed.
    """
    with _tracer.start_as_current_span(
        f"{consumer} process",
        # Not a child of whatever was current when the consumer started its tasks.
        context=Context(),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.operation": "process",
            "messaging.consumer.group.name": consumer,
            "messaging.batch.message_count": size,
        },
    ) as batch:
        spans = BatchSpans(consumer, batch, _live())
        try:
            yield spans
        except Exception as exc:
            for span in spans.started:
                if span.is_recording():
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            for span in spans.started:
                span.end()


def _live() -> bool:
    """Whether spans started now may record: not while no tracer provider is configured,
    when the API makes no-op spans (the batch path then skips parsing each message's
    traceparent for them). A tracer other than the API's proxy came from a provider
    configured before this module was imported."""
    if not isinstance(_tracer, ProxyTracer):
        return True
    return not isinstance(trace.get_tracer_provider(), ProxyTracerProvider | NoOpTracerProvider)


def as_current(span: Span | None) -> contextlib.AbstractContextManager[Any]:
    """Make ``span`` the current span in the block (nothing if ``None``), without ending
    it or recording an exception on it: whoever started it does that."""
    if span is None:
        return contextlib.nullcontext()
    return trace.use_span(span, record_exception=False, set_status_on_exception=False)


def traceparent_of(span: Span) -> str | None:
    """The W3C ``traceparent`` of ``span``, or ``None`` if its context is not valid."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, or ``None`` outside any valid span."""
    return traceparent_of(trace.get_current_span())
