"""Choreographed sagas and the flow tracker given odd input: a first event without a
correlation id, correlation ids and texts wider than the columns, event data that is
no JSON object, odd ages and clocks, markup in a correlation id. On both databases."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from accord.cli.app import _register_subcommands, app
from accord.db import Database
from accord.db.schema import outbox
from accord.errors import ConfigurationError
from accord.inbox import Consumer, DeadLetters, HandlerContext
from accord.messages import Message
from accord.outbox.writer import message_from_row
from accord.sagas import Choreography, Flows, FlowTracker, StepFailed
from accord.testing import CapturedDelivery
from accord.transports.sql import SqlTransport


def trip() -> Choreography:
    return Choreography("trip", completed="trip.booked", compensated="trip.cancelled")


def consumer(database: Database, name: str) -> Consumer:
    transport = SqlTransport(database=database, channel=f"odd-{uuid.uuid4().hex[:8]}")
    return Consumer(name, database, transport, max_attempts=3)


def hotel_steps(flow: Choreography, hotels: Consumer) -> list[str]:
    """Hotels reserves on ``trip.requested`` and cancels on ``car.failed``; the list
    the two append to ("reserved", "cancelled") as they run."""
    ran: list[str] = []

    @flow.on(hotels, "trip.requested", emits="hotel.reserved", fails="trip.cancelled")
    async def reserve_hotel(ctx: HandlerContext, data: Any) -> None:
        ran.append("reserved")

    @flow.compensate(hotels, "car.failed", emits="trip.cancelled")
    async def cancel_hotel(ctx: HandlerContext, data: Any) -> None:
        ran.append("cancelled")

    return ran


async def handled(consumer: Consumer, message: Message) -> CapturedDelivery:
    delivery = CapturedDelivery(message)
    await consumer.handle(delivery)
    return delivery


async def emitted(database: Database, type: str) -> list[Message]:
    query = sa.select(outbox.c.headers, outbox.c.payload).where(outbox.c.event_type == type)
    async with database.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [message_from_row(r.headers, r.payload) for r in rows]


async def test_a_first_event_without_correlation_id_arriving_after_its_compensation(
    database: Database,
) -> None:
    """Hotels and cars both react to a ``trip.requested`` that has a key and no
    correlation id. Cars refuses; its ``car.failed`` carries the request's id as the
    correlation id (as every event a handler emits). Hotels compensates, then gets
    the request late: it is not applied. (It was looked up under the key, while the
    compensation was recorded under the correlation id: the hotel stayed reserved.)"""
    await database.upgrade()
    flow = trip()
    hotels, cars = consumer(database, "hotels"), consumer(database, "cars")
    held = hotel_steps(flow, hotels)

    @flow.on(cars, "trip.requested", emits="car.rented", fails="car.failed")
    async def rent_car(ctx: HandlerContext, data: Any) -> None:
        raise StepFailed("no car left")

    request = Message(type="trip.requested", data={}, key="customer-7")
    assert (await handled(cars, request)).outcome == "ack"
    (failed,) = await emitted(database, "car.failed")
    assert failed.correlationid == request.id
    assert (await handled(hotels, failed)).outcome == "ack"
    assert (await handled(hotels, request)).outcome == "ack"  # the hotels' branch, late
    assert held == ["cancelled"]
    assert await emitted(database, "hotel.reserved") == []


@pytest.mark.parametrize("length", [101, 200, 500])
async def test_a_flow_with_a_long_correlation_id_compensates_and_is_tracked(
    database: Database, length: int
) -> None:
    """A correlation id wider than the participations' saga id column (100): the
    compensation runs and a late step event after it is not applied. On PostgreSQL
    the compensation's record was refused ('value too long'), so it was retried and
    dead-lettered, never run. The tracker records its messages, and a timeline is
    found by the id they carry (past 200 characters too)."""
    await database.upgrade()
    flow = trip()
    hotels = consumer(database, "hotels")
    held = hotel_steps(flow, hotels)

    flow_id = ("f" * (length - 4)) + uuid.uuid4().hex[:4]
    failed = {"flowstep": "rent_car", "flowoutcome": "failed"}
    failure = Message(type="car.failed", data={}, correlationid=flow_id, extensions=failed)
    assert (await handled(hotels, failure)).outcome == "ack"
    again = Message(type="car.failed", data={}, correlationid=flow_id)
    assert (await handled(hotels, again)).outcome == "ack"  # once is enough
    late = Message(type="trip.requested", data={}, correlationid=flow_id)
    assert (await handled(hotels, late)).outcome == "ack"
    assert held == ["cancelled"]
    assert await DeadLetters(database).list() == []
    (cancelled,) = await emitted(database, "trip.cancelled")

    tracker = FlowTracker(database, SqlTransport(database=database, channel="t"), retention=None)
    for message in (failure, cancelled):
        assert (await handled(tracker.consumer, message)).outcome == "ack"
    timeline = await Flows(database).timeline(flow_id)
    assert [(e.type, e.outcome) for e in timeline] == [
        ("car.failed", "failed"),
        ("trip.cancelled", "compensated"),
    ]
    assert await DeadLetters(database).list() == []


async def test_the_tracker_records_messages_whose_texts_are_wider_than_its_columns(
    database: Database,
) -> None:
    """A message's source, subject, causation id and extensions have no limit; the
    columns they go to do. On PostgreSQL the tracker's insert was refused, the message
    dead-lettered and missing from its flow. Each is recorded, cut to the column."""
    await database.upgrade()
    tracker = FlowTracker(database, SqlTransport(database=database, channel="t"), retention=None)
    flow_id = str(uuid.uuid4())
    messages = [
        Message(
            type="trip.requested",
            source="s" * 300,
            causationid="c" * 300,
            correlationid=flow_id,
            extensions={"flowstep": "x" * 300, "flowoutcome": "next"},
        ),
        Message(type="hotel.reserved", subject="y" * 300, correlationid=flow_id),
        Message(type="odd.outcome", correlationid=flow_id, extensions={"flowoutcome": "o" * 30}),
    ]
    for message in messages:
        delivery = await handled(tracker.consumer, message)
        assert delivery.outcome == "ack", delivery.reason
    assert await DeadLetters(database).list() == []
    timeline = await Flows(database).timeline(flow_id)
    assert [(e.source, e.step, e.causation_id, e.outcome) for e in timeline] == [
        ("s" * 200, "x" * 200, "c" * 200, "next"),
        ("accord", "y" * 200, None, None),
        ("accord", None, None, "o" * 20),
    ]


@pytest.mark.parametrize(
    "data, kind",
    [([1, 2], "an array"), ("hi", "a string"), (5, "a number"), (True, "a boolean")],
)
async def test_event_data_that_is_no_json_object_is_dead_lettered_at_once(
    database: Database, data: Any, kind: str
) -> None:
    """A step or compensation event whose data is not a JSON object: the handlers
    merge it into the next event's data. It failed with a TypeError ('cannot convert
    dictionary update sequence element #0 to a sequence') at every attempt, the
    compensating function ran (rolled back) each time. Now it is dead-lettered at the
    first, saying what the data must be, and nothing runs; data null still works."""
    await database.upgrade()
    flow = trip()
    hotels = consumer(database, "hotels")
    ran = hotel_steps(flow, hotels)

    for type in ("trip.requested", "car.failed"):
        message = Message(type=type, data=data, correlationid=str(uuid.uuid4()))
        delivery = await handled(hotels, message)
        assert delivery.outcome == "ack"
    assert ran == []
    letters = await DeadLetters(database).list()
    assert len(letters) == 2
    for letter in letters:
        assert letter.kind == "invalid_data", letter
        assert f"must be a JSON object (or null), not {kind}" in letter.reason
    for type in ("trip.requested", "car.failed"):
        message = Message(type=type, data=None, correlationid=str(uuid.uuid4()))
        assert (await handled(hotels, message)).outcome == "ack"
    assert ran == ["reserved", "cancelled"]
    assert len(await DeadLetters(database).list()) == 2


@pytest.mark.parametrize(
    "correlation_id, says",
    [
        ("", "non-empty"),
        ("x" * 201, "at most 200"),
        ("a\nb", "control character"),
    ],
)
async def test_start_refuses_a_correlation_id_that_cannot_name_a_flow(
    database: Database, correlation_id: str, says: str
) -> None:
    """``start`` with an empty correlation id started a new random flow each time (a
    retried start was a second flow); too long or with a control character, it failed
    with an error about ``Message.key``/``partitionkey``. Each is refused, naming
    ``correlation_id``, and nothing is added to the outbox."""
    await database.upgrade()
    with pytest.raises(ConfigurationError, match=f"correlation_id.*{says}|{says}.*correlation"):
        async with database.transaction() as conn:
            await trip().start(conn, "trip.requested", {}, correlation_id=correlation_id)
    assert await emitted(database, "trip.requested") == []
    async with database.transaction() as conn:
        started = await trip().start(conn, "trip.requested", {}, correlation_id="x" * 200)
    assert started == "x" * 200


async def test_stalled_and_prune_refuse_a_negative_age_or_a_naive_now(
    database: Database,
) -> None:
    """A negative age reported a flow recorded a moment ago as stalled, and pruning
    with ``stalled`` deleted it; a naive ``now`` failed as a database error; an age
    reaching before year 1 raised OverflowError. Now the first two are refused with
    what to pass instead, and the last selects nothing."""
    await database.upgrade()
    tracker = FlowTracker(database, SqlTransport(database=database, channel="t"), retention=None)
    flow_id = str(uuid.uuid4())
    started = Message(
        type="trip.requested", correlationid=flow_id, extensions={"flowoutcome": "next"}
    )
    await handled(tracker.consumer, started)
    flows = Flows(database)
    with pytest.raises(ConfigurationError, match="older_than must be a timedelta of 0 or more"):
        await flows.stalled(timedelta(seconds=-60))
    with pytest.raises(ConfigurationError, match="older_than must be a timedelta of 0 or more"):
        await flows.prune(timedelta(days=-1), stalled=True)
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        await flows.stalled(timedelta(0), now=datetime(2030, 1, 1))
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        await flows.prune(timedelta(0), now=datetime(2030, 1, 1), stalled=True)
    assert await flows.stalled(timedelta(days=999_999)) == []
    assert await flows.prune(timedelta(days=999_999), stalled=True) == 0
    assert [e.type for e in await flows.timeline(flow_id)] == ["trip.requested"]
    later = datetime.now(UTC) + timedelta(hours=1)
    assert [f.correlation_id for f in await flows.stalled(timedelta(0), now=later)] == [flow_id]


@pytest.mark.parametrize(
    "options, says",
    [
        ({"stalled_after": timedelta(seconds=-1)}, "stalled_after must be a positive"),
        ({"stalled_after": timedelta(0)}, "stalled_after must be a positive"),
        ({"retention": timedelta(days=-1)}, "retention must be a timedelta of 0 or more"),
        ({"retention": 7}, "retention must be a timedelta"),
        ({"check_interval": 0}, "check_interval"),
        ({"check_interval": float("nan")}, "check_interval"),
    ],
)
def test_flow_tracker_refuses_settings_that_would_misreport(
    sqlite_url: str, options: dict[str, Any], says: str
) -> None:
    """A negative ``stalled_after`` reported every moving flow as stalled; a
    ``check_interval`` of 0 checked without pause; a ``retention`` that is no
    timedelta failed every round's prune (logged, and again the next round)."""
    database = Database(sqlite_url)
    with pytest.raises(ConfigurationError, match=says):
        FlowTracker(database, SqlTransport(database=database, channel="t"), **options)
    asyncio.run(database.dispose())


def test_flows_show_prints_a_correlation_id_as_it_is(db_url: str) -> None:
    """Rich markup in a correlation id: ``[/x]`` crashed ``accord flows show`` with a
    MarkupError traceback, ``[bold]`` vanished from the title."""
    flow_ids = ["trip[/x]1", "[bold]trip-2"]

    async def record() -> None:
        async with Database(db_url) as database:
            tracker = FlowTracker(
                database, SqlTransport(database=database, channel="t"), retention=None
            )
            for flow_id in flow_ids:
                message = Message(
                    type="trip.requested", correlationid=flow_id, extensions={"flowoutcome": "next"}
                )
                await handled(tracker.consumer, message)

    asyncio.run(record())
    _register_subcommands()
    for flow_id in flow_ids:
        result = CliRunner().invoke(app, ["flows", "show", flow_id, "--db", db_url])
        assert result.exit_code == 0, result.output
        assert f"Flow {flow_id}" in result.output
