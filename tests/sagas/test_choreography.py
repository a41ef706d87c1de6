"""Choreographed sagas on a real database and broker, and the flow tracker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from accord.db import Database
from accord.inbox import Consumer, HandlerContext, Inbox
from accord.sagas import FlowEntry, Flows, FlowTracker, StepFailed
from accord.testing import wait_for
from accord.transports.base import Transport
from accord.transports.rabbitmq import RabbitTransport
from tests.brokers import delete_everything
from tests.conftest import RABBIT_URL, fresh_pg_database
from tests.sagas import app, choreo_app
from tests.sagas.conftest import World


@pytest.fixture
async def choreo_world(world: World) -> AsyncIterator[World]:
    """``world``, whose tracker's queue is deleted too (``World`` knows only its groups)."""
    yield world
    await world.stop()
    if world.kind == "rabbitmq":
        await delete_everything({world.channel: {f"{world.prefix}-tracker"}})


async def start_choreography(world: World) -> FlowTracker:
    await world.start(orchestrator=False, participants=False)  # the relay
    tracker = FlowTracker(
        world.database,
        world.transport,
        name=f"{world.prefix}-tracker",
        stalled_after=timedelta(seconds=1),
        check_interval=0.2,
    )
    await world.run_parts(
        [*choreo_app.services(world.database, world.transport, world.prefix), tracker]
    )
    return tracker


async def begin(world: World, **data: Any) -> str:
    async with world.database.transaction() as conn:
        return await choreo_app.trip.start(conn, "trip.requested", data, source="test")


async def end_of(flows: Flows, correlation_id: str) -> str | None:
    """The type of the event that ended the flow, None while it runs."""
    for entry in await flows.timeline(correlation_id):
        if entry.outcome in ("completed", "compensated"):
            return entry.type
    return None


async def ended(world: World, correlation_id: str) -> str | None:
    return await end_of(Flows(world.database), correlation_id)


async def ledger(world: World, correlation_id: str) -> list[tuple[int, str]]:
    return [(s, op) for c, s, op in await app.ledger_rows(world.database) if c == correlation_id]


async def test_choreography_happy_path_and_failure_at_each_step(choreo_world: World) -> None:
    world = choreo_world
    await start_choreography(world)
    flows = {fail_at: await begin(world, fail_at=fail_at) for fail_at in (None, 1, 2, 3)}
    for fail_at, correlation_id in flows.items():
        end = await wait_for(lambda c=correlation_id: ended(world, c), 20)
        assert end == ("trip.booked" if fail_at is None else "trip.cancelled")
        assert await ledger(world, correlation_id) == choreo_app.expected(fail_at), fail_at

    timeline = await Flows(world.database).timeline(flows[3])
    assert [(e.type, e.outcome) for e in timeline] == [
        ("trip.requested", "next"),
        ("hotel.reserved", "next"),
        ("car.rented", "next"),
        ("payment.failed", "failed"),
        ("car.returned", "compensating"),
        ("trip.cancelled", "compensated"),
    ]
    assert timeline[3].source == f"{world.prefix}-cars" and timeline[3].step == "charge_card"
    assert "step 3 refused" in (timeline[3].error or "")


async def test_choreography_compensation_retried_until_done_and_a_stuck_one_is_stalled(
    choreo_world: World,
) -> None:
    world = choreo_world
    tracker = await start_choreography(world)
    flaky = await begin(world, fail_at=3, comp_fail={"2": 2, "1": 1})
    assert await wait_for(lambda: ended(world, flaky), 20) == "trip.cancelled"
    assert await ledger(world, flaky) == choreo_app.expected(3)
    await app.set_outage(world.database, 1, True)  # hotel cancellations are down
    stuck = await begin(world, fail_at=2)

    async def reported() -> list[str]:
        return [f.correlation_id for f in await tracker.check()]

    assert await wait_for(reported, 20) == [stuck]
    (stalled,) = await Flows(world.database).stalled(timedelta(seconds=1))
    assert stalled.last_type == "car.failed"
    assert await Flows(world.database).stalled(timedelta(hours=1)) == []


# -- two services, each on its own PostgreSQL database, chained through RabbitMQ ----------


@pytest.fixture
async def cars_url(pg_template: str) -> AsyncIterator[str]:
    async with fresh_pg_database(pg_template) as url:
        yield url


class Deployment:
    """The hotels and cars services as deployed: each its own database, relay and
    RabbitMQ connection; a flow tracker recording into the hotels database."""

    def __init__(self, hotels_url: str, cars_url: str) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.channel = f"choreo-{self.prefix}"
        self.hotels = Database(hotels_url, pool_size=3, max_overflow=3)
        self.cars = Database(cars_url, pool_size=3, max_overflow=3)
        self.transports: list[Transport] = []
        self.parts: list[Any] = []
        self.tasks: list[asyncio.Task[None]] = []

    def transport(self) -> Transport:
        made = RabbitTransport(RABBIT_URL, channel=self.channel)
        self.transports.append(made)
        return made

    async def run(self, *parts: Any) -> None:
        for part in parts:
            self.parts.append(part)
            self.tasks.append(asyncio.create_task(part.run()))
        for part in parts:
            consumer = getattr(part, "consumer", part)
            if isinstance(consumer, Consumer):
                await wait_for(lambda c=consumer: c._subscription is not None, 10)

    async def start(self, batch_size: int = 1) -> FlowTracker:
        """Both services and the tracker; ``batch_size`` > 1 runs the services' consumers
        in batch mode (a failing step's savepoint then sits in a shared transaction)."""
        for database in (self.hotels, self.cars):
            await choreo_app.create_state(database)
        hotels, cars = self.transport(), self.transport()
        tracker = FlowTracker(
            self.hotels, self.transport(), name=f"{self.prefix}-tracker", check_interval=0.2
        )
        await self.run(
            choreo_app.relay(self.hotels, hotels),
            choreo_app.hotels_consumer(self.hotels, hotels, self.prefix, batch_size=batch_size),
            choreo_app.relay(self.cars, cars),
            choreo_app.cars_consumer(self.cars, cars, self.prefix, batch_size=batch_size),
            tracker,
        )
        return tracker

    async def close(self) -> None:
        for part in self.parts:
            with contextlib.suppress(Exception):
                await part.stop()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 10)
        for transport in self.transports:
            with contextlib.suppress(Exception):
                await transport.close()
        groups = {f"{self.prefix}-{g}" for g in (choreo_app.HOTELS, choreo_app.CARS, "tracker")}
        await delete_everything({self.channel: groups})
        await self.hotels.dispose()
        await self.cars.dispose()


@pytest.fixture
async def deployment(pg_url: str, cars_url: str) -> AsyncIterator[Deployment]:
    made = Deployment(pg_url, cars_url)
    yield made
    await made.close()


def steps(timeline: list[FlowEntry]) -> list[tuple[str, str, str | None, str | None]]:
    return [(e.type, e.source, e.step, e.outcome) for e in timeline]


@pytest.mark.postgres
@pytest.mark.rabbitmq
@pytest.mark.parametrize("batch_size", [1, 16])
async def test_two_services_on_their_own_databases_complete_or_compensate_together(
    deployment: Deployment, batch_size: int
) -> None:
    await deployment.start(batch_size)
    hotels, cars = f"{deployment.prefix}-hotels", f"{deployment.prefix}-cars"
    scenarios: list[dict[str, Any]] = [
        {},
        {"fail_at": 1},
        {"fail_at": 2},
        {"fail_at": 3},
        {"fail_at": 3, "comp_fail": {"2": 2, "1": 1}},  # both compensations retried
    ]
    async with deployment.hotels.transaction() as conn:  # they arrive together: batches
        flows = [
            await choreo_app.trip.start(conn, "trip.requested", data, source="hotels")
            for data in scenarios
        ]
    tracked = Flows(deployment.hotels)
    for flow_id, data in zip(flows, scenarios, strict=True):
        end = await wait_for(lambda f=flow_id: end_of(tracked, f), 20)
        assert end == ("trip.cancelled" if data else "trip.booked"), data

    # Each service's own database holds its own part of every flow, and nothing else.
    for service, database in (
        (choreo_app.HOTELS, deployment.hotels),
        (choreo_app.CARS, deployment.cars),
    ):
        want = {
            flow_id: choreo_app.expected_at(service, data.get("fail_at"))
            for flow_id, data in zip(flows, scenarios, strict=True)
        }
        assert await choreo_app.effects_of(database) == {f: e for f, (e, _) in want.items() if e}
        assert await choreo_app.holdings_of(database) == {f: h for f, (_, h) in want.items() if h}

    booked, _, _, _, flaky = flows
    timeline = await tracked.timeline(booked)
    assert steps(timeline) == [
        ("trip.requested", "hotels", "trip.start", "next"),
        ("hotel.reserved", hotels, "reserve_hotel", "next"),
        ("car.rented", cars, "rent_car", "next"),
        ("trip.booked", cars, "charge_card", "completed"),
    ]
    # Each message was caused by the one before: the chain crosses both databases.
    assert timeline[0].causation_id is None
    assert [e.causation_id for e in timeline[1:]] == [e.message_id for e in timeline[:-1]]

    timeline = await tracked.timeline(flaky)
    assert steps(timeline) == [
        ("trip.requested", "hotels", "trip.start", "next"),
        ("hotel.reserved", hotels, "reserve_hotel", "next"),
        ("car.rented", cars, "rent_car", "next"),
        ("payment.failed", cars, "charge_card", "failed"),
        ("car.returned", cars, "return_car", "compensating"),
        ("trip.cancelled", hotels, "cancel_hotel", "compensated"),
    ]
    assert [e.causation_id for e in timeline[1:]] == [e.message_id for e in timeline[:-1]]
    assert timeline[3].error == "StepFailed: step 3 refused"
    # What ``accord flows show --json`` prints.
    shown = json.loads(json.dumps([e.as_dict() for e in timeline]))
    assert [e["outcome"] for e in shown] == [
        "next",
        "next",
        "next",
        "failed",
        "compensating",
        "compensated",
    ]
    assert await tracked.stalled(timedelta(0)) == []


@pytest.mark.postgres
@pytest.mark.rabbitmq
async def test_a_step_event_that_arrives_after_its_compensation_is_not_applied(
    deployment: Deployment,
) -> None:
    """Hotels and cars both react to ``trip.requested`` (parallel branches); a refused
    car compensates the hotel. Hotels runs two competing workers and its reservation is
    slow: the other worker takes ``car.failed`` while the reservation is in flight. The
    compensation waits for it and undoes it: the trip ends cancelled, holding nothing.
    (Without the per-flow record the compensation ran first, found nothing to cancel,
    and the late reservation stayed.)"""
    for database in (deployment.hotels, deployment.cars):
        await choreo_app.create_state(database)
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_hotel_system(step: str, flow_id: str) -> None:
        if step == "reserve_hotel":
            entered.set()
            await release.wait()

    hotels, cars = deployment.transport(), deployment.transport()
    workers = [
        choreo_app.hotels_consumer(
            deployment.hotels, hotels, deployment.prefix, hook=slow_hotel_system, prefetch=1
        )
        for _ in range(2)
    ]
    fanout_cars = Consumer(
        f"{deployment.prefix}-cars", deployment.cars, cars, **choreo_app.CONSUMER_OPTIONS
    )

    @choreo_app.trip.on(fanout_cars, "trip.requested", emits="car.rented", fails="car.failed")
    async def rent_car(ctx: HandlerContext, data: dict[str, Any]) -> None:
        raise StepFailed("no car left")

    tracked = Flows(deployment.hotels)
    await deployment.run(
        choreo_app.relay(deployment.hotels, hotels),
        *workers,
        choreo_app.relay(deployment.cars, cars),
        fanout_cars,
        FlowTracker(deployment.hotels, deployment.transport(), name=f"{deployment.prefix}-tracker"),
    )
    try:
        flow_id = await choreo_app.start(deployment.hotels, {})
        await wait_for(entered.is_set, 10)
        # While one worker holds the reservation, car.failed reaches the other one.
        await wait_for(lambda: _delivered(tracked, flow_id, "car.failed"), 10)
        await asyncio.sleep(0.3)
    finally:
        release.set()
    await wait_for(lambda: end_of(tracked, flow_id), 10)
    request = (await tracked.timeline(flow_id))[0]
    await wait_for(
        lambda: Inbox(deployment.hotels).processed(
            f"{deployment.prefix}-hotels", request.message_id
        ),
        10,
    )
    timeline = steps(await tracked.timeline(flow_id))
    held = (await choreo_app.holdings_of(deployment.hotels)).get(flow_id, [])
    assert ("hotel", "RESERVED") not in held, (held, timeline)


async def _delivered(tracked: Flows, flow_id: str, message_type: str) -> bool:
    return any(entry.type == message_type for entry in await tracked.timeline(flow_id))


async def test_a_compensation_runs_once_for_two_failure_events_of_one_flow(
    database: Database,
) -> None:
    """Two branches of one flow fail (two failure events, one correlation id) and the
    same compensation handles both: it runs, and emits, once; the second event changes
    nothing. A second compensation of the flow at the same service still runs."""
    import sqlalchemy as sa

    from accord.db.schema import outbox
    from accord.messages import Message
    from accord.sagas import Choreography
    from accord.testing import CapturedDelivery
    from accord.transports.sql import SqlTransport

    await database.upgrade()
    flow = Choreography("twice", completed="twice.done", compensated="twice.undone")
    consumer = Consumer("hotel-svc", database, SqlTransport(database=database, channel="twice"))
    ran: list[str] = []

    @flow.compensate(consumer, "car.failed", "flight.failed", emits="hotel.released")
    async def release_hotel(ctx: HandlerContext, data: Any) -> None:
        ran.append(ctx.message.type)

    @flow.compensate(consumer, "hotel.released", emits="twice.undone")
    async def release_deposit(ctx: HandlerContext, data: Any) -> None:
        ran.append(ctx.message.type)

    flow_id = str(uuid.uuid4())
    for failed in ("car.failed", "flight.failed"):
        message = Message(type=failed, data={}, correlationid=flow_id)
        await consumer.handle(CapturedDelivery(message))
    await consumer.handle(
        CapturedDelivery(Message(type="hotel.released", data={}, correlationid=flow_id))
    )
    assert ran == ["car.failed", "hotel.released"]
    async with database.connect() as conn:
        emitted = (await conn.scalars(sa.select(outbox.c.event_type))).all()
    assert sorted(emitted) == ["hotel.released", "twice.undone"]


async def test_two_compensations_that_share_a_function_name_both_run(
    db_url: str,
) -> None:
    """Two different compensations of one flow at one service whose functions share a
    name (``undo`` from a factory): each runs once; neither is taken for the other."""
    import sqlalchemy as sa

    from accord.db.schema import outbox
    from accord.messages import Message
    from accord.sagas import Choreography
    from accord.testing import CapturedDelivery
    from accord.transports.sql import SqlTransport

    database = Database(db_url)
    flow = Choreography("same-name", completed="sn.done", compensated="sn.undone")
    consumer = Consumer("svc", database, SqlTransport(database=database, channel="same-name"))
    ran: list[str] = []

    def compensation(label: str) -> Any:
        async def undo(ctx: HandlerContext, data: Any) -> None:
            ran.append(label)

        return undo

    flow.compensate(consumer, "car.failed", emits="deposit.released")(compensation("balance"))
    flow.compensate(consumer, "deposit.released", emits="sn.undone")(compensation("deposit"))

    flow_id = str(uuid.uuid4())
    for failed in ("car.failed", "deposit.released"):
        delivery = CapturedDelivery(Message(type=failed, data={}, correlationid=flow_id))
        await consumer.handle(delivery)
        assert delivery.outcome == "ack"
    async with database.connect() as conn:
        emitted = sorted((await conn.scalars(sa.select(outbox.c.event_type))).all())
    await database.dispose()
    assert ran == ["balance", "deposit"]
    assert emitted == ["deposit.released", "sn.undone"]
