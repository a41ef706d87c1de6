"""What a handler receives, and how its registration parses the message data."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.messages import Message
from accord.observability import current_traceparent, traceparent_of
from accord.outbox import add as add_to_outbox

log = logging.getLogger("accord.inbox")

__all__ = [
    "BatchFunc",
    "HandlerContext",
    "HandlerFunc",
    "Registration",
    "describe_validation_error",
    "run_after_commit",
]


@dataclass
class HandlerContext:
    """The handler's view of the message it handles and of its transaction.

    ``conn`` is the transaction the inbox row is written in: write your effects
    with it and they commit together with the inbox row, or not at all.
    """

    conn: AsyncConnection
    message: Message
    consumer: str
    attempt: int = 1
    committed: list[Callable[[], None]] = field(default_factory=list, repr=False)
    #: This message's CONSUMER span when the consumer cannot make it the current span:
    #: in batch mode, where a batch function handles many messages in one call (the
    #: span ends with the batch's transaction). ``None`` when the handler runs inside
    #: its message's span, which is then the current one, and in batch mode while no
    #: tracer provider is configured (no span would record).
    span: Span | None = field(default=None, repr=False)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once this handler's transaction has committed; never if
        it rolls back (a batch that fails and is replayed one message at a time runs
        it once, for the commit that counts). For effects outside the database:
        metrics, in-process caches, notifications. Exceptions are logged, not raised.
        """
        self.committed.append(callback)

    @property
    def redelivered(self) -> bool:
        """Whether this message was delivered to this consumer before."""
        return self.attempt > 1

    @property
    def traceparent(self) -> str | None:
        """The W3C traceparent for a message emitted while handling this one: a child of
        this message's span (:attr:`span`, else the current span), or, outside any
        valid span, this message's own traceparent."""
        own = current_traceparent() if self.span is None else traceparent_of(self.span)
        return own or self.message.traceparent

    async def publish(self, *messages: Message) -> None:
        """Add messages to the outbox in the handler's transaction (sent iff it commits).

        A message without a correlation id gets this message's (or its id); without a
        causation id, this message's id; without a traceparent, :attr:`traceparent`.
        """
        parent = self.message
        traceparent = self.traceparent
        filled = [
            m.with_(
                correlationid=m.correlationid or parent.correlationid or parent.id,
                causationid=m.causationid or parent.id,
                traceparent=m.traceparent or traceparent,
            )
            for m in messages
        ]
        await add_to_outbox(self.conn, *filled)


def run_after_commit(callbacks: Iterable[Callable[[], None]]) -> None:
    """Run what a transaction that just committed left to do; a callback that raises
    is logged and the others still run (the commit stands either way). Only
    ``KeyboardInterrupt`` and ``SystemExit`` go on: anything else, a ``BaseException``
    of its own included, must not keep the committed message from being acked."""
    for callback in callbacks:
        try:
            callback()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:
            log.exception("an after-commit callback failed")


HandlerFunc = Callable[[HandlerContext, Any], Awaitable[None]]

#: Handles several messages in one call: ``[(ctx, data), ...]`` in arrival order, all
#: in one transaction (every ``ctx.conn`` is the same connection).
BatchFunc = Callable[[Sequence[tuple[HandlerContext, Any]]], Awaitable[None]]


@dataclass
class Registration:
    """A handler for one message type (or one topic pattern), with its optional schema."""

    pattern: str
    func: HandlerFunc
    schema: Any = None
    batch: BatchFunc | None = None
    _adapter: TypeAdapter[Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.schema is not None:
            self._adapter = TypeAdapter(self.schema)

    @property
    def is_pattern(self) -> bool:
        """Whether this registration is an AMQP-style pattern rather than one exact type."""
        return any(word in ("*", "#") for word in self.pattern.split("."))

    def parse(self, data: Any) -> Any:
        """The message data as the handler wants it; raises pydantic's ValidationError."""
        if self._adapter is None:
            return data
        return self._adapter.validate_python(data)


def describe_validation_error(schema: Any, exc: ValidationError) -> str:
    """'data does not match <Schema>: field 'a.b': <why> (got <input>); ...'."""
    name = getattr(schema, "__name__", repr(schema))
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error.get("loc", ())) or "<data>"
        got = repr(error.get("input"))
        if len(got) > 80:
            got = got[:77] + "..."
        problems.append(f"field '{location}': {error.get('msg')} (got {got})")
    return f"data does not match {name}: " + "; ".join(problems)
