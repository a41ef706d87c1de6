"""Hosts whose clocks differ: availability and leases are the database server's time.

Two processes on two hosts are played in one: each "host" has its own Database, and
a host's clock is skewed by patching the ``datetime`` its code reads (the modules
that read the local clock before ``ServerClock``, and ``accord.db.clock`` since).
Without the server's time, a producer 30 s ahead of the relay, or a relay 30 s
behind the producers, held every message back for 30 s.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from tests.clocks import SKEW, ahead, clock_of, server_now, skew, skewed_datetime

from accord import Message, add_to_outbox, outbox_transaction
from accord.db import Database, ServerClock
from accord.db.schema import outbox
from accord.errors import DatabaseError
from accord.outbox import OutboxAdmin, Relay
from accord.testing import Collector, wait_for
from accord.transports.sql import SqlTransport

# -- the clock ----------------------------------------------------------------------------


@pytest.mark.postgres
async def test_a_skewed_hosts_clock_reads_the_servers_time(
    host: Callable[[], Database],
) -> None:
    database = host()
    clock = ServerClock(database, local=ahead(SKEW))
    measures = count_measures(clock)
    assert abs(clock.now() - (await server_now(database)) - SKEW) < timedelta(seconds=1)
    await clock.sync_if_due()
    assert abs(clock.offset + SKEW) < timedelta(milliseconds=200)
    url = database.engine.url
    gauge = REGISTRY.get_sample_value(
        "accord_db_clock_offset_seconds", {"database": f"{url.host}:{url.port}/{url.database}"}
    )
    assert gauge is not None and abs(gauge + SKEW.total_seconds()) < 0.2
    assert abs(clock.now() - await server_now(database)) < timedelta(milliseconds=200)
    await clock.sync_if_due()  # not due for five minutes: no round trip
    assert measures == [1]


def count_measures(clock: ServerClock) -> list[int]:
    """[how many times ``clock`` measured the offset so far], kept up to date."""
    measures = [0]
    measure = clock._measure

    async def counted(conn: Any) -> timedelta:
        measures[0] += 1
        return await measure(conn)

    clock._measure = counted  # type: ignore[method-assign]
    return measures


@pytest.mark.postgres
@pytest.mark.parametrize("step", [SKEW, -SKEW], ids=["forward", "back"])
async def test_a_local_clock_set_after_the_measure_is_measured_again_at_once(
    host: Callable[[], Database], step: timedelta
) -> None:
    """NTP (or an operator) sets the host's clock 30 s forward or back a minute after
    the measure: the offset measured before no longer holds, and for the five
    minutes until the next measure every lease and availability was 30 s off."""
    database = host()
    setting = [timedelta(0)]
    clock = ServerClock(database, local=lambda: datetime.now(UTC) + setting[0])
    measures = count_measures(clock)
    await clock.sync_if_due()
    setting[0] = step
    assert abs(clock.now() - await server_now(database) - step) < timedelta(seconds=1)
    await clock.sync_if_due()
    assert measures == [2]
    assert abs(clock.now() - await server_now(database)) < timedelta(milliseconds=200)
    await clock.sync_if_due()  # the clock holds still again: no more measures
    assert measures == [2]


async def test_on_sqlite_the_servers_clock_is_the_local_one(sqlite_url: str) -> None:
    async with Database(sqlite_url) as database:
        clock = ServerClock(database, local=lambda: datetime.now(UTC) + SKEW)
        await clock.sync_if_due()
        assert await clock.sync() == timedelta(0)
        assert abs(clock.now() - datetime.now(UTC) - SKEW) < timedelta(seconds=1)


async def test_a_server_out_of_reach_keeps_the_last_offset() -> None:
    database = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none?connect_timeout=2")
    try:
        clock = ServerClock(database)
        clock.offset = timedelta(seconds=3)
        await clock.sync_if_due()  # logged, not raised
        assert clock.offset == timedelta(seconds=3)
    finally:
        await database.dispose()


def _stepped_back_after(calls: int, step: timedelta) -> tuple[Callable[[], datetime], list[int]]:
    """A local clock that is set ``step`` back after its ``calls``-th reading."""
    read = [0]

    def local() -> datetime:
        read[0] += 1
        now = datetime.now(UTC)
        return now if read[0] <= calls else now - step

    return local, read


@pytest.mark.postgres
async def test_a_clock_set_back_during_a_measure_is_not_left_off(
    host: Callable[[], Database],
) -> None:
    """NTP steps the host's clock 30 s back while the measure waits for the server's
    first answer. Timed on that clock, the sample's round trip read negative, so it
    was kept as the fastest, with an offset off by half the step, and the anchor,
    read after the samples on the stepped clock, hid the step: 15 s off the server's
    until the next measure, five minutes later."""
    database = host()
    local, _ = _stepped_back_after(1, timedelta(seconds=30))
    clock = ServerClock(database, local=local)
    await clock.sync_if_due()
    await clock.sync_if_due()  # a step noticed since would be measured again here
    assert abs(clock.now() - await server_now(database)) < timedelta(seconds=1)


# -- the outbox ---------------------------------------------------------------------------


async def relay_and_collector(relay_host: Database) -> tuple[Relay, Collector, SqlTransport]:
    transport = SqlTransport(relay_host.url, channel=f"clock-{uuid.uuid4().hex[:8]}")
    await transport.connect()
    received = Collector()
    await transport.subscribe("audit", received)
    relay = Relay(relay_host, transport, poll_interval=0.05)
    return relay, received, transport


async def published_at_once(relay: Relay, received: Collector, ids: set[str]) -> None:
    async def out() -> bool:
        await relay.run_once()
        return set(received.ids) >= ids

    await wait_for(out, 5, interval=0.1)


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["add_to_outbox", "outbox_transaction"])
async def test_a_producer_ahead_of_the_relay_does_not_hold_its_messages_back(
    host: Callable[[], Database], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    producer, relay_host = host(), host()
    await producer.upgrade()
    skew(monkeypatch, SKEW, "accord.outbox.writer")  # the producer's host
    relay, received, transport = await relay_and_collector(relay_host)
    try:
        message = Message(type="clock.ahead")
        if how == "add_to_outbox":
            async with producer.transaction() as conn:
                await add_to_outbox(conn, message)
        else:
            async with outbox_transaction(producer) as conn:
                await add_to_outbox(conn, message)
        async with producer.connect() as conn:
            row = (await conn.execute(sa.select(outbox.c.available_at, outbox.c.created_at))).one()
        now = await server_now(producer)
        assert row.available_at == row.created_at <= now
        assert now - row.available_at < timedelta(seconds=5)
        await published_at_once(relay, received, {message.id})
    finally:
        await transport.close()


@pytest.mark.postgres
async def test_a_relay_behind_the_producers_takes_their_messages_at_once(
    host: Callable[[], Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    producer, relay_host = host(), host()
    await producer.upgrade()
    skew(monkeypatch, -SKEW, "accord.outbox.relay")  # before the server's clock
    clock_of(relay_host, -SKEW)
    relay, received, transport = await relay_and_collector(relay_host)
    try:
        messages = [Message(type="clock.behind", data=n) for n in range(3)]
        async with producer.transaction() as conn:
            await add_to_outbox(conn, *messages)
        await published_at_once(relay, received, {m.id for m in messages})
    finally:
        await transport.close()


@pytest.mark.postgres
async def test_a_saga_started_on_a_host_ahead_sends_its_first_command_at_once(
    host: Callable[[], Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    from accord.sagas import Orchestrator, Saga, command

    orchestrator_host, relay_host = host(), host()
    await orchestrator_host.upgrade()
    skew(monkeypatch, SKEW, "accord.sagas._store", "accord.outbox.writer")
    relay, received, transport = await relay_and_collector(relay_host)
    try:
        saga = Saga("clocked").step("ask", command("clocked.ask"), timeout=60)
        orchestrator = Orchestrator(orchestrator_host, transport, [saga])
        saga_id = await orchestrator.start("clocked", {})

        async def asked() -> bool:
            await relay.run_once()
            return any(m is not None and m.correlationid == saga_id for m, _ in received.received)

        await wait_for(asked, 5, interval=0.1)
    finally:
        await transport.close()


# -- the SQL transport --------------------------------------------------------------------


@pytest.mark.postgres
async def test_sql_transport_a_publisher_ahead_does_not_hold_its_messages_back(
    host: Callable[[], Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher_host, consumer_host = host(), host()
    await publisher_host.upgrade()
    skew(monkeypatch, SKEW, "accord.transports.sql")  # read the clock there before
    clock_of(publisher_host, SKEW)
    channel = f"clock-{uuid.uuid4().hex[:8]}"
    publisher = SqlTransport(channel=channel, database=publisher_host)
    consumer = SqlTransport(channel=channel, database=consumer_host, poll_interval=0.05)
    received = Collector()
    try:
        await consumer.subscribe("audit", received)
        message = Message(type="clock.ahead")
        await publisher.publish([message])
        await received.wait(1, timeout=5)
        assert received.ids == [message.id]
    finally:
        await publisher.close()
        await consumer.close()


@pytest.mark.postgres
async def test_sql_transport_a_consumer_behind_does_not_lose_its_lease_to_another(
    host: Callable[[], Database],
) -> None:
    """A consumer 30 s behind leases a delivery for 3 s: by its own clock the lease
    ran out 27 s ago, and another member of the group would take the delivery while
    the first still handles it. In server time the lease holds. (Before the server
    clock, both consumers read the clock in one module: one process cannot give them
    different clocks, so this guards the corrected path rather than replaying the
    old one.)"""
    behind_host, other_host = host(), host()
    await behind_host.upgrade()
    clock_of(behind_host, -SKEW)
    channel = f"clock-{uuid.uuid4().hex[:8]}"
    behind = SqlTransport(channel=channel, database=behind_host, lease=3.0, poll_interval=0.05)
    other = SqlTransport(channel=channel, database=other_host, lease=3.0, poll_interval=0.05)
    seen: list[tuple[str, str]] = []
    release = asyncio.Event()

    async def slow(delivery: Any) -> None:
        seen.append(("behind", delivery.message.id))
        await release.wait()

    async def quick(delivery: Any) -> None:
        seen.append(("other", delivery.message.id))

    try:
        await behind.subscribe("workers", slow, prefetch=1)
        message = Message(type="clock.leased")
        await behind.publish([message])
        await wait_for(lambda: seen, 5, interval=0.05)
        await other.subscribe("workers", quick, prefetch=1)
        await asyncio.sleep(1.5)  # the other member polls every 50 ms meanwhile
        assert seen == [("behind", message.id)]
        release.set()
    finally:
        release.set()
        await behind.close()
        await other.close()


# -- a second reader while the first measure is under way ------------------------------


@pytest.mark.postgres
async def test_a_reader_while_the_first_measure_is_under_way_gets_the_servers_time(
    host: Callable[[], Database],
) -> None:
    """Two components share a Database (a relay's two rounds, a subscription and a
    publish): the second to call sync_if_due() while the first measures must not
    go on with the uncorrected clock."""
    database = host()
    clock = ServerClock(database, local=ahead(SKEW))
    first = asyncio.create_task(clock.sync_if_due())
    await asyncio.sleep(0)  # the first measure is under way (waiting for its connection)
    try:
        await clock.sync_if_due()
        error = clock.now() - await server_now(database)
        assert abs(error) < timedelta(seconds=1), f"read {error} off the server's time"
    finally:
        await first


@pytest.mark.postgres
async def test_a_lease_relay_ahead_does_not_take_another_relays_leased_row_while_measuring(
    host: Callable[[], Database],
) -> None:
    """A relay 30 s ahead, whose Database's clock another component is measuring
    (e.g. its other round, concurrency=2, on start): its round reads server + 30 s,
    so a row another relay leased for 20 s more is due by it and published twice."""
    producer, relay_host = host(), host()
    message = Message(type="clock.leased", key="k")
    async with producer.transaction() as conn:
        await add_to_outbox(conn, message)
    async with producer.transaction() as conn:  # another relay's lease, 20 s more
        await conn.execute(
            outbox.update().values(available_at=sa.func.now() + timedelta(seconds=20))
        )
    relay_host.clock = ServerClock(relay_host, local=ahead(SKEW))
    transport = SqlTransport(relay_host.url, channel=f"clock-{uuid.uuid4().hex[:8]}")
    await transport.connect()
    received = Collector()
    await transport.subscribe("audit", received)
    relay = Relay(relay_host, transport, claims="lease", lease=30.0)
    measuring = asyncio.create_task(relay_host.clock.sync_if_due())
    await asyncio.sleep(0)
    try:
        published = await relay.run_once()
        await asyncio.sleep(0.3)
        assert (published, received.ids) == (0, [])
    finally:
        await measuring
        await transport.close()


# -- a measure that failed ----------------------------------------------------------------


class _Loop:
    """The running loop, but with ``time()`` as the test says."""

    def __init__(self, loop: asyncio.AbstractEventLoop, at: list[float]) -> None:
        self._loop, self._at = loop, at

    def time(self) -> float:
        return self._at[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


class _Asyncio:
    def __init__(self, at: list[float]) -> None:
        self._at = at

    def get_running_loop(self) -> Any:
        return _Loop(asyncio.get_running_loop(), self._at)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


@pytest.mark.postgres
async def test_a_first_measure_that_failed_is_tried_again_within_a_minute(
    host: Callable[[], Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay started while the database is not up yet (containers starting
    together): its first measure fails. A minute later the database answers, yet
    the clock stays uncorrected (a host 30 s off holds messages back or takes
    others' leases) until five minutes after the failure."""
    database = host()
    clock = ServerClock(database, local=ahead(SKEW))
    at = [1000.0]
    monkeypatch.setattr("accord.db.clock.asyncio", _Asyncio(at))
    measure = clock.sync
    calls = 0

    async def down_at_first() -> timedelta:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise DatabaseError("connection refused (the server is starting)")
        return await measure()

    monkeypatch.setattr(clock, "sync", down_at_first)
    await clock.sync_if_due()  # fails: logged, offset still zero
    at[0] += 60.0
    await clock.sync_if_due()
    error = clock.now() - await server_now(database)
    assert abs(error) < timedelta(seconds=1), f"read {error} off the server's time"


# -- the outbox's status ------------------------------------------------------------------


@pytest.mark.postgres
async def test_outbox_status_on_a_host_behind_gives_the_rows_age(
    host: Callable[[], Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows take the server's now(); the age of the oldest PENDING row (what one
    alerts on) is still the admin host's clock minus it: 30 s behind, -30 s."""
    producer, admin_host = host(), host()
    async with producer.transaction() as conn:
        await add_to_outbox(conn, Message(type="clock.age", data=str(uuid.uuid4())))
    monkeypatch.setattr("accord.outbox.admin.datetime", skewed_datetime(-SKEW))
    age = (await OutboxAdmin(admin_host).status()).oldest_pending_age
    assert age is not None
    assert 0 <= age < 5, f"a row added a moment ago is {age:.1f} s old"


# -- saga deadlines -----------------------------------------------------------------------


@pytest.mark.postgres
async def test_a_saga_deadline_set_on_a_host_behind_is_not_fired_early_by_another(
    host: Callable[[], Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orchestrator replicas share the deadlines: one on a host 30 s behind starts a
    saga whose step times out in 10 s. By its clock the deadline was 20 s before
    the real time already, and a replica on a right clock fired it at once (the
    step "timed out" before its participant could answer)."""
    from accord.sagas import Orchestrator, Saga, SagaAdmin, command

    behind_host, other_host = host(), host()
    await behind_host.upgrade()
    skew(monkeypatch, -SKEW, "accord.sagas._store", "accord.sagas._orchestrator")
    clock_of(behind_host, -SKEW)
    saga = Saga("timed").step("ask", command("timed.ask"), timeout=10)
    channel = f"clock-{uuid.uuid4().hex[:8]}"
    behind = Orchestrator(behind_host, SqlTransport(channel=channel, database=behind_host), [saga])
    other = Orchestrator(other_host, SqlTransport(channel=channel, database=other_host), [saga])
    saga_id = await behind.start("timed", {})
    assert await other.fire_due(datetime.now(UTC)) == 0  # a right clock: 10 s to go
    later = await server_now(other_host) + timedelta(seconds=11)
    assert await other.fire_due(later) == 1
    events = [e.event for e in await SagaAdmin(other_host).history(saga_id)]
    assert "timed_out" in events


# -- consumer dead letters ----------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("off", ["operator ahead", "consumer behind"])
async def test_a_replayed_dead_letter_is_handled_at_once_whatever_the_hosts_clocks(
    host: Callable[[], Database], monkeypatch: pytest.MonkeyPatch, off: str
) -> None:
    """An operator replays a dead letter from a host 30 s ahead of the consumer's, or
    the consumer's host is 30 s behind: the replay was due 30 s late, since each read
    its own clock. (The two are played one after the other: one process cannot give
    them different clocks at the same time in the old code.)"""
    from accord.inbox import Consumer, DeadLetters, HandlerContext

    consumer_host, operator_host = host(), host()
    await consumer_host.upgrade()
    name = f"clock-{uuid.uuid4().hex[:8]}"
    transport = SqlTransport(channel=name, database=consumer_host, poll_interval=0.05)
    handled: list[str] = []
    broken = True

    def consumer() -> Consumer:
        made = Consumer(name, consumer_host, transport, max_attempts=1, replay_interval=0.05)

        @made.handler("clock.replayed")
        async def on_replayed(ctx: HandlerContext, data: Any) -> None:
            if broken:
                raise KeyError("not yet")
            handled.append(ctx.message.id)

        return made

    first = consumer()
    await first.start()
    message = Message(type="clock.replayed")
    try:
        await transport.publish([message])
        letters = await wait_for(lambda: DeadLetters(consumer_host).list(name), 5, interval=0.05)
    finally:
        await first.stop()
    broken = False
    modules = ("accord.inbox._dead_letters",)
    if off == "operator ahead":
        skew(monkeypatch, SKEW, *modules)
        clock_of(operator_host, SKEW)
        await DeadLetters(operator_host).replay(letters[0].id)
        monkeypatch.undo()
    else:
        await DeadLetters(operator_host).replay(letters[0].id)
        skew(monkeypatch, -SKEW, *modules)
        clock_of(consumer_host, -SKEW)
    second = consumer()
    await second.start()
    try:

        async def replayed() -> bool:
            # The letter is deleted in the handler's transaction, which commits after
            # the handler appended.
            return bool(handled) and not await DeadLetters(consumer_host).list(name)

        await wait_for(replayed, 5, interval=0.05)
        assert handled == [message.id]
    finally:
        await second.stop()
        await transport.close()
