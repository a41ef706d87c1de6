"""Spans in batch mode: every message applied in a batch transaction gets its own process
span, child of its traceparent, and what is emitted while handling it continues that
span, whether from a plain batch function, a saga participant or the orchestrator. On
the SQL transport (SQLite, PostgreSQL), with a recording tracer in place of an SDK."""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from accord.db import Database
from accord.db.schema import outbox
from accord.inbox import Consumer, HandlerContext
from accord.messages import Message
from accord.observability import _tracing, current_traceparent
from accord.outbox.writer import message_from_row
from accord.sagas import (
    CommandContext,
    Orchestrator,
    Saga,
    StepContext,
    StepFailed,
    participant,
)
from accord.sagas import command as command_step
from accord.testing import CapturedDelivery, wait_for
from accord.transports.sql import SqlTransport
from tests.inbox.conftest import Broker, unique
from tests.inbox.test_batches import backlog
from tests.sagas import app

# -- a tracer that records its spans (the API alone has none, and no SDK is installed) --


class RecordedSpan(Span):
    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: list[Link],
    ) -> None:
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.links = [link.context for link in links]
        self.status = Status(StatusCode.UNSET)
        self.exceptions: list[BaseException] = []
        self.ended = False

    def end(self, end_time: int | None = None) -> None:
        assert not self.ended, f"span {self.name} ended twice"
        self.ended = True

    def get_span_context(self) -> SpanContext:
        return self.context

    def set_attributes(self, attributes: Any) -> None:
        self.attributes.update(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        pass

    def add_link(self, context: SpanContext, attributes: Any = None) -> None:
        self.links.append(context)

    def update_name(self, name: str) -> None:
        self.name = name

    def is_recording(self) -> bool:
        return not self.ended

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        self.status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Any = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.exceptions.append(exception)

    @property
    def traceparent(self) -> str:
        return f"00-{self.context.trace_id:032x}-{self.context.span_id:016x}-01"


class RecordingTracer(trace.Tracer):
    def __init__(self) -> None:
        self.spans: list[RecordedSpan] = []

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> RecordedSpan:
        parent = trace.get_current_span(context).get_span_context()
        valid = parent if parent.is_valid else None
        span = RecordedSpan(
            name,
            SpanContext(
                valid.trace_id if valid else random.getrandbits(128),
                random.getrandbits(64),
                is_remote=False,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            ),
            valid,
            kind,
            dict(attributes or {}),
            list(links or []),
        )
        self.spans.append(span)
        return span

    @contextlib.contextmanager  # type: ignore[override]
    def start_as_current_span(
        self, name: str, context: Context | None = None, **kwargs: Any
    ) -> Iterator[Span]:
        end_on_exit = kwargs.pop("end_on_exit", True)
        span = self.start_span(name, context, **kwargs)
        with trace.use_span(span, end_on_exit=end_on_exit) as current:
            yield current

    def named(self, name: str) -> list[RecordedSpan]:
        return [s for s in self.spans if s.name == name]

    def of(self, message: Message) -> list[RecordedSpan]:
        """The process spans of ``message``, in the order they started."""
        return [s for s in self.spans if s.attributes.get("messaging.message.id") == message.id]


@pytest.fixture
def tracer(monkeypatch: pytest.MonkeyPatch) -> RecordingTracer:
    recording = RecordingTracer()
    monkeypatch.setattr(_tracing, "_tracer", recording)
    return recording


@pytest.fixture
async def broker(db_url: str) -> AsyncIterator[Broker]:
    """The SQL transport on the test database."""
    made = Broker("sql", db_url)
    yield made
    await made.close()


@pytest.fixture
async def consumers() -> AsyncIterator[Callable[..., Consumer]]:
    made: list[Consumer] = []

    def make(*args: Any, **kwargs: Any) -> Consumer:
        consumer = Consumer(*args, backoff_base=0.02, backoff_cap=0.2, **kwargs)
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        await consumer.stop()


def traced(message: Message) -> Message:
    """``message`` as sent from a span of a trace of its own."""
    parent = f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-01"
    return message.with_(traceparent=parent)


def span_context_of(traceparent: str | None) -> tuple[int, int]:
    """(trace id, parent span id) of a W3C traceparent."""
    assert traceparent is not None
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


def assert_child_of_its_message(span: RecordedSpan, message: Message, consumer: str) -> None:
    assert span.name == f"{message.type} process" and span.kind == SpanKind.CONSUMER
    assert span.parent is not None
    assert (span.parent.trace_id, span.parent.span_id) == span_context_of(message.traceparent)
    assert span.attributes == {
        "messaging.operation": "process",
        "messaging.consumer.group.name": consumer,
        "messaging.message.id": message.id,
        "messaging.message.conversation_id": message.correlationid or message.id,
        "cloudevents.event_type": message.type,
        "cloudevents.event_source": message.source,
    }
    assert span.ended


async def outbox_messages(database: Database) -> list[Message]:
    async with database.connect() as conn:
        query = sa.select(outbox.c.headers, outbox.c.payload).order_by(outbox.c.seq)
        rows = (await conn.execute(query)).all()
    return [message_from_row(headers, payload) for headers, payload in rows]


async def caused_by(database: Database, count: int) -> dict[str, Message]:
    """The outbox's messages by causation id, once there are ``count``."""

    async def found() -> dict[str, Message]:
        sent = {m.causationid: m for m in await outbox_messages(database) if m.causationid}
        return sent if len(sent) >= count else {}

    return await wait_for(found)


# -- a batch function ---------------------------------------------------------------------


async def test_each_message_of_a_batch_has_its_span_and_what_it_publishes_continues_it(
    database: Database, broker: Broker, consumers: Callable[..., Consumer], tracer: RecordingTracer
) -> None:
    name = unique()
    consumer = consumers(name, database, broker.transport(), batch_size=16)
    sizes: list[int] = []

    async def one(ctx: HandlerContext, data: Any) -> None:  # a batch of one
        await ctx.publish(Message(type="test.echoed", data=data))

    async def many(items: Sequence[tuple[HandlerContext, Any]]) -> None:
        sizes.append(len(items))
        for ctx, data in items:
            await ctx.publish(Message(type="test.echoed", data=data))

    current: dict[str, str | None] = {}

    async def plain(ctx: HandlerContext, data: Any) -> None:
        current[ctx.message.id] = current_traceparent()
        await ctx.publish(Message(type="test.echoed", data=data))

    consumer.add_handler("test.scored", one, batch=many)
    consumer.add_handler("test.noted", plain)  # its messages split the batch function's runs
    messages = [
        traced(Message(type="test.noted" if i % 10 == 9 else "test.scored", data={"n": i}))
        for i in range(40)
    ]
    await backlog(broker, consumer, messages)
    await consumer.start()
    echoes = await caused_by(database, len(messages))

    assert max(sizes) > 1
    for message in messages:
        [span] = tracer.of(message)
        assert_child_of_its_message(span, message, name)
        echo = echoes[message.id]
        assert span_context_of(echo.traceparent) == (
            span.context.trace_id,
            span.context.span_id,
        ), "an echo's parent is its own message's span"
        if message.type == "test.noted":  # a plain handler runs with its span current
            assert current[message.id] == span.traceparent
    # One span per batch transaction (a batch of one takes the one-message path),
    # linking to the spans of its messages.
    batches = tracer.named(f"{name} process")
    assert all(s.ended and s.parent is None for s in batches)
    for batch in batches:
        assert len(batch.links) == batch.attributes["messaging.batch.message_count"] > 1
    linked = {link.span_id for batch in batches for link in batch.links}
    assert linked <= {tracer.of(m)[0].context.span_id for m in messages}
    assert len(linked) == sum(len(batch.links) for batch in batches)


async def test_the_spans_of_a_failed_batch_fail_and_its_messages_are_traced_again(
    database: Database, broker: Broker, consumers: Callable[..., Consumer], tracer: RecordingTracer
) -> None:
    name = unique()
    consumer = consumers(name, database, broker.transport(), batch_size=16)
    failed: list[Message] = []

    async def one(ctx: HandlerContext, data: Any) -> None:
        await ctx.publish(Message(type="test.echoed", data=data))

    async def many(items: Sequence[tuple[HandlerContext, Any]]) -> None:
        if not failed and len(items) > 1:
            failed.extend(ctx.message for ctx, _ in items)
            raise RuntimeError("the batch breaks")
        for ctx, data in items:
            await ctx.publish(Message(type="test.echoed", data=data))

    consumer.add_handler("test.scored", one, batch=many)
    messages = [traced(Message(type="test.scored", data={"n": i})) for i in range(10)]
    await backlog(broker, consumer, messages)
    await consumer.start()
    echoes = await caused_by(database, len(messages))

    assert failed
    for message in failed:
        # The batch's span, ended failed, then the span of its one-at-a-time retry.
        batched, alone = tracer.of(message)
        assert_child_of_its_message(batched, message, name)
        assert batched.status.status_code == StatusCode.ERROR
        assert [str(e) for e in batched.exceptions] == ["the batch breaks"]
        assert_child_of_its_message(alone, message, name)
        assert alone.status.status_code == StatusCode.UNSET
        echo = echoes[message.id]
        assert span_context_of(echo.traceparent) == (alone.context.trace_id, alone.context.span_id)


async def test_without_a_tracer_provider_a_batch_keeps_each_messages_traceparent(
    database: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    """No SDK: no span is started for a batch function (they would all be no-ops), yet
    what it publishes carries its message's traceparent, and a plain handler still runs
    with its message's trace current, as in the one-message path."""
    name = unique()
    consumer = consumers(name, database, broker.transport(), batch_size=16)
    current: dict[str, str | None] = {}

    async def plain(ctx: HandlerContext, data: Any) -> None:
        current[ctx.message.id] = current_traceparent()
        await ctx.publish(Message(type="test.echoed", data=data))

    async def one(ctx: HandlerContext, data: Any) -> None:  # a batch of one
        await ctx.publish(Message(type="test.echoed", data=data))

    spans: list[Any] = []

    async def many(items: Sequence[tuple[HandlerContext, Any]]) -> None:
        for ctx, data in items:
            spans.append(ctx.span)
            await ctx.publish(Message(type="test.echoed", data=data))

    consumer.add_handler("test.scored", one, batch=many)
    consumer.add_handler("test.noted", plain)
    messages = [
        traced(Message(type="test.scored" if i % 3 else "test.noted", data={"n": i}))
        for i in range(12)
    ]
    messages.append(Message(type="test.scored", data={"n": "untraced"}))
    await backlog(broker, consumer, messages)
    await consumer.start()
    echoes = await caused_by(database, len(messages))
    for message in messages:
        assert echoes[message.id].traceparent == message.traceparent
    assert current == {m.id: m.traceparent for m in messages if m.type == "test.noted"}
    assert spans and not any(spans), "no span is started for a batch function"


# -- sagas --------------------------------------------------------------------------------


def command(saga_id: str, type: str, step: int) -> Message:
    return Message(
        type=type,
        data={},
        key=saga_id,
        correlationid=saga_id,
        extensions={
            "sagaid": saga_id,
            "sagastep": str(step),
            "sagaphase": "action",
            "sagaattempt": "1",
            "sagareply": "accord.saga.trip.reply",
        },
    )


def success(saga: str, saga_id: str, step: int) -> Message:
    """A participant's reply: ``step`` of ``saga_id`` (a ``saga`` saga) succeeded."""
    return Message(
        type=f"accord.saga.{saga}.reply",
        key=saga_id,
        data={
            "saga_id": saga_id,
            "step": step,
            "phase": "action",
            "attempt": 1,
            "ok": True,
            "result": None,
            "error": None,
        },
    )


async def test_a_participants_replies_in_a_batch_continue_each_commands_span(
    database: Database, broker: Broker, tracer: RecordingTracer
) -> None:
    await app.create_tables(database)
    prefix = unique("p")
    hotels, _ = app.participant_consumers(database, broker.transport(), prefix, batch_size=16)
    try:
        commands = [traced(command(str(uuid.uuid4()), "hotels.reserve", 1)) for _ in range(20)]
        await backlog(broker, hotels, commands)
        await hotels.start()
        replies = await caused_by(database, len(commands))
    finally:
        await hotels.stop()

    assert max(await app.transaction_sizes(database, hotels.name)) > 1
    for sent in commands:
        [span] = tracer.of(sent)
        assert_child_of_its_message(span, sent, hotels.name)
        reply = replies[sent.id]
        assert reply.type == "accord.saga.trip.reply" and reply.data["ok"]
        assert span_context_of(reply.traceparent) == (span.context.trace_id, span.context.span_id)


async def test_a_participant_function_runs_under_its_commands_span_in_every_batch_mode(
    database: Database, tracer: RecordingTracer
) -> None:
    """Plain batches, the one-at-a-time replay of a failed one, and the careful batches
    after it (a savepoint per function): the function always sees its command's span."""
    await app.create_tables(database)
    channel = unique("pt")
    consumer = Consumer(unique("pt"), database, SqlTransport(database.url, channel=channel))
    consumer.batch_size = 16
    seen: dict[str, list[str | None]] = {}

    @participant(consumer, "hotels.reserve")
    async def reserve(ctx: CommandContext, data: dict[str, Any]) -> None:
        seen.setdefault(ctx.message.id, []).append(current_traceparent())
        if data.get("refuse"):
            raise StepFailed("no room")

    def commands(refuse: int | None = None) -> list[Message]:
        made = [traced(command(str(uuid.uuid4()), "hotels.reserve", 1)) for _ in range(3)]
        if refuse is not None:
            made[refuse] = made[refuse].with_(data={"refuse": True})
        return made

    plain, failing, careful = commands(), commands(refuse=1), commands(refuse=0)
    for batch in (plain, failing, careful):
        await consumer.handle_batch([CapturedDelivery(m) for m in batch])

    def contexts(spans: list[RecordedSpan]) -> list[tuple[int, int]]:
        return [(span.context.trace_id, span.context.span_id) for span in spans]

    for message in plain + failing + careful:
        spans = tracer.of(message)
        if message in failing:
            # Each got a span in the batch that failed, then another alone. Its function
            # ran in the batch up to the refusal, then alone.
            assert len(spans) == 2
            if message is failing[2]:
                spans = spans[1:]
        else:
            assert len(spans) == 1
        assert [span_context_of(tp) for tp in seen[message.id]] == contexts(spans)


async def test_a_batch_participant_function_gets_each_commands_span(
    database: Database, tracer: RecordingTracer
) -> None:
    await app.create_tables(database)
    consumer = Consumer(unique("pb"), database, SqlTransport(database.url, channel=unique("c")))
    consumer.batch_size = 16
    spans: dict[str, Span | None] = {}

    @participant(consumer, "hotels.reserve", batch=True)
    async def reserve(commands: Sequence[tuple[CommandContext, Any]]) -> None:
        spans.update((ctx.message.id, ctx.span) for ctx, _ in commands)

    messages = [traced(command(str(uuid.uuid4()), "hotels.reserve", 1)) for _ in range(4)]
    await consumer.handle_batch([CapturedDelivery(m) for m in messages])
    for message in messages:
        [span] = tracer.of(message)
        assert spans[message.id] is span


async def test_the_orchestrators_commands_in_a_batch_continue_each_replys_span(
    database: Database, broker: Broker, tracer: RecordingTracer
) -> None:
    await app.create_tables(database)
    name = unique("orch")
    orchestrator = Orchestrator(
        database, broker.transport(), [app.make_trip()], name=name, batch_size=16
    )
    consumer = orchestrator.consumer
    try:
        saga_ids = [await orchestrator.start("trip", {}) for _ in range(20)]
        replies = [traced(success("trip", saga_id, 1)) for saga_id in saga_ids]
        await backlog(broker, consumer, replies)
        await consumer.start()

        async def rent_car_commands() -> dict[str, Message]:
            sent = {m.key: m for m in await outbox_messages(database) if m.type == "cars.rent"}
            return sent if len(sent) == len(saga_ids) else {}

        commands = await wait_for(rent_car_commands)
    finally:
        await consumer.stop()

    assert max(await app.transaction_sizes(database, name)) > 1
    for reply in replies:
        [span] = tracer.of(reply)
        assert_child_of_its_message(span, reply, name)
        sent = commands[reply.key]
        assert span_context_of(sent.traceparent) == (span.context.trace_id, span.context.span_id)


async def test_a_local_step_after_a_reply_in_a_batch_runs_under_that_replys_span(
    database: Database, tracer: RecordingTracer
) -> None:
    seen: dict[str, str | None] = {}

    async def note(ctx: StepContext) -> None:
        seen[ctx.saga_id] = current_traceparent()

    saga = Saga("traced").step("remote", command_step("t.do")).step("local", note)
    transport = SqlTransport(database.url, channel=unique("o"))
    orchestrator = Orchestrator(database, transport, [saga], name=unique("orch"), batch_size=16)
    saga_ids = [await orchestrator.start("traced", {}) for _ in range(5)]
    replies = [traced(success("traced", saga_id, 0)) for saga_id in saga_ids]
    await orchestrator.consumer.handle_batch([CapturedDelivery(r) for r in replies])
    for reply in replies:
        [span] = tracer.of(reply)
        assert span_context_of(seen[reply.key or ""]) == (
            span.context.trace_id,
            span.context.span_id,
        )


async def test_a_sagas_first_command_continues_the_span_that_started_it(
    database: Database, broker: Broker, tracer: RecordingTracer
) -> None:
    await app.create_tables(database)
    orchestrator = Orchestrator(database, broker.transport(), [app.make_trip()], name=unique())
    with tracer.start_as_current_span("book a trip") as span:
        saga_id = await orchestrator.start("trip", {})
    [first] = [m for m in await outbox_messages(database) if m.key == saga_id]
    context = span.get_span_context()
    assert span_context_of(first.traceparent) == (context.trace_id, context.span_id)
