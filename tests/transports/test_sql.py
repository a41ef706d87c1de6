"""The SQL transport on SQLite and PostgreSQL: the contract suite plus its own promises."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import queue, queue_deliveries
from accord.errors import ConfigurationError, PublishError, TransportUnavailable
from accord.messages import Message
from accord.testing import Collector, TransportContract, wait_for
from accord.transports.base import Delivery, Envelope, Handler, Transport
from accord.transports.sql import SqlSubscription, SqlTransport


class TestSqlTransportOnSqlite(TransportContract):
    timeout = 15.0

    @pytest.fixture
    def transport_factory(self, tmp_path: Path) -> Any:
        url = f"sqlite+aiosqlite:///{tmp_path / 'queue.db'}"
        return lambda channel: SqlTransport(url, channel=channel, poll_interval=0.1, lease=2.0)

    async def publish_raw(self, transport: Transport, headers: dict[str, str], body: bytes) -> None:
        assert isinstance(transport, SqlTransport)
        await transport.publish_raw(headers, body)


@pytest.mark.postgres
class TestSqlTransportOnPostgres(TransportContract):
    timeout = 15.0

    @pytest.fixture
    def transport_factory(self, pg_url: str) -> Any:
        return lambda channel: SqlTransport(pg_url, channel=channel, poll_interval=0.1, lease=2.0)

    async def publish_raw(self, transport: Transport, headers: dict[str, str], body: bytes) -> None:
        assert isinstance(transport, SqlTransport)
        await transport.publish_raw(headers, body)


# -- the SQL transport's own promises ---------------------------------------------------

CHILD_CONSUMER = r"""
import asyncio, sys
from accord.transports.sql import SqlTransport

async def main(url, channel):
    transport = SqlTransport(url, channel=channel, poll_interval=0.05, lease=1.0)
    await transport.connect()

    async def hang(delivery):
        print("got", delivery.message.id, delivery.attempt, flush=True)
        await asyncio.Event().wait()

    await transport.subscribe("workers", hang)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.fixture
def channel() -> str:
    return f"sql-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def transports(db_url: str, channel: str) -> AsyncIterator[Callable[..., SqlTransport]]:
    """Make connected-on-demand SqlTransports on the test database; closed at teardown."""
    made: list[SqlTransport] = []

    def make(**options: Any) -> SqlTransport:
        options.setdefault("poll_interval", 0.05)
        transport = SqlTransport(db_url, channel=channel, **options)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.close()


@pytest.fixture
async def children() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Subprocesses started by a test; killed at teardown whatever happened."""
    procs: list[asyncio.subprocess.Process] = []
    yield procs
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _count(transport: SqlTransport, table: sa.Table) -> int:
    async with transport.database.connect() as conn:
        value = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(table)
            .where(table.c.channel == transport.channel)
        )
    return int(value or 0)


async def _read_line(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        raise AssertionError(f"child exited (code {await proc.wait()}) without printing")
    return line.decode().strip()


@pytest.mark.fault
async def test_delivery_of_a_sigkilled_consumer_comes_back_after_the_lease(
    db_url: str,
    channel: str,
    transports: Callable[..., SqlTransport],
    children: list[asyncio.subprocess.Process],
) -> None:
    publisher = transports()
    await publisher.connect()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD_CONSUMER, db_url, channel, stdout=asyncio.subprocess.PIPE
    )
    children.append(proc)
    assert await _read_line(proc) == "ready"
    sent = Message(type="job.started", data={"n": 1})
    await publisher.publish([sent])
    assert await _read_line(proc) == f"got {sent.id} 1"
    proc.send_signal(signal.SIGKILL)
    await proc.wait()

    survivor = transports(lease=1.0)
    collector = Collector()
    await survivor.subscribe("workers", collector)
    await collector.wait(1, timeout=15)
    message, attempt = collector.received[0]
    assert message is not None and message.id == sent.id
    assert attempt == 2, "the dead consumer's claim counts as an attempt"

    async def settled() -> bool:
        return await _count(survivor, queue_deliveries) == 0

    await wait_for(settled, 10)


async def test_per_key_order_holds_with_competing_consumers(
    transports: Callable[..., SqlTransport],
) -> None:
    keys = [f"k{i}" for i in range(20)]
    sent = [
        Message(type="score.awarded", data={"n": n}, key=keys[n % len(keys)]) for n in range(200)
    ]
    in_flight: set[str] = set()
    overlaps: list[str] = []
    done: dict[str, list[int]] = {key: [] for key in keys}
    handled_by: dict[str, int] = {"a": 0, "b": 0}
    rng = random.Random(7)

    def handler_for(name: str) -> Handler:
        async def handle(delivery: Delivery) -> None:
            message = delivery.message
            assert message is not None and message.key is not None
            if message.key in in_flight:
                overlaps.append(f"{message.key}#{message.data['n']}")
            in_flight.add(message.key)
            try:
                await asyncio.sleep(rng.random() * 0.003)
                if message.data["n"] % 7 == 3 and delivery.attempt == 1:
                    await delivery.nack(0.05)  # later messages of this key must wait
                    return
                done[message.key].append(message.data["n"])
                handled_by[name] += 1
            finally:
                in_flight.discard(message.key)

        return handle

    publisher, a, b = transports(), transports(), transports()
    await a.subscribe("workers", handler_for("a"), prefetch=4)
    await b.subscribe("workers", handler_for("b"), prefetch=4)
    for start in range(0, len(sent), 20):
        await publisher.publish(sent[start : start + 20])

    def all_done() -> bool:
        return sum(len(v) for v in done.values()) >= len(sent)

    await wait_for(all_done, 30)
    assert overlaps == [], "two consumers held the same key at once"
    for index, key in enumerate(keys):
        assert done[key] == list(range(index, 200, len(keys))), f"key {key} out of order"
    assert handled_by["a"] > 0 and handled_by["b"] > 0, handled_by


@pytest.mark.postgres
async def test_postgres_consumer_wakes_on_notify_not_on_poll(pg_url: str, channel: str) -> None:
    publisher = SqlTransport(pg_url, channel=channel, poll_interval=30)
    consumer = SqlTransport(pg_url, channel=channel, poll_interval=30)
    try:
        collector = Collector()
        subscription = await consumer.subscribe("live", collector)
        assert isinstance(subscription, SqlSubscription)

        def idle() -> bool:
            return subscription.idle

        for n in range(3):
            await wait_for(idle, 5)
            await publisher.publish([Message(type="live.tick", data={"n": n})])
            await collector.wait(n + 1, timeout=5)  # far below the 30 s poll
    finally:
        await publisher.close()
        await consumer.close()


async def test_cleanup_removes_messages_every_group_has_settled(
    transports: Callable[..., SqlTransport],
) -> None:
    transport = transports(cleanup_batch=3)
    fast, slow = Collector(), Collector()
    await transport.subscribe("fast", fast)
    slow_subscription = await transport.subscribe("slow", slow)
    await transport.publish([Message(type="t.x", data=n) for n in range(10)])
    await fast.wait(10)
    await slow.wait(10)

    async def deliveries_settled() -> bool:
        return await _count(transport, queue_deliveries) == 0

    await wait_for(deliveries_settled, 10)
    assert await _count(transport, queue) == 10
    assert await transport.cleanup() == 10  # in batches of 3
    assert await _count(transport, queue) == 0

    await slow_subscription.stop()
    await transport.publish([Message(type="t.x", data=n) for n in range(4)])
    await fast.wait(14)

    async def only_slow_left() -> bool:
        return await _count(transport, queue_deliveries) == 4

    await wait_for(only_slow_left, 10)
    assert await transport.cleanup() == 0, "a message the slow group still needs was deleted"
    assert await _count(transport, queue) == 4


async def test_cleanup_goes_past_messages_a_lagging_group_still_needs(
    transports: Callable[..., SqlTransport],
) -> None:
    """The messages a lagging group still needs sit in front; every settled one
    behind them goes, batch after batch (a round goes on from where its last batch
    ended instead of walking the needed ones again each batch)."""
    transport = transports(cleanup_batch=3)
    fast = Collector()
    await transport.subscribe("fast", fast)
    slow_subscription = await transport.subscribe("slow", Collector())
    await slow_subscription.stop()
    await transport.publish([Message(type="t.x", data=n) for n in range(11)])
    await fast.wait(11)

    async def fast_settled() -> bool:
        return await _count(transport, queue_deliveries) == 11  # the slow group's

    await wait_for(fast_settled, 10)
    async with transport.database.transaction() as conn:  # slow settles all but 4
        mine = sa.select(queue.c.seq).where(queue.c.channel == transport.channel)
        seqs = (await conn.execute(mine.order_by(queue.c.seq))).scalars().all()
        await conn.execute(queue_deliveries.delete().where(queue_deliveries.c.seq.in_(seqs[4:])))
    assert await transport.cleanup() == 7
    assert await _count(transport, queue) == 4


async def test_cleanup_runs_periodically(transports: Callable[..., SqlTransport]) -> None:
    transport = transports(cleanup_interval=0.2)
    collector = Collector()
    await transport.subscribe("g", collector)
    await transport.publish([Message(type="t.x", data=n) for n in range(5)])
    await collector.wait(5)

    async def cleaned() -> bool:
        return await _count(transport, queue) == 0

    await wait_for(cleaned, 10)


async def test_stop_gives_unsettled_deliveries_back_at_once(
    transports: Callable[..., SqlTransport],
) -> None:
    transport = transports(lease=30.0)
    seen: list[Delivery] = []

    async def hang(delivery: Delivery) -> None:
        seen.append(delivery)
        await asyncio.Event().wait()

    subscription = await transport.subscribe("g", hang, prefetch=10)
    sent = [Message(type="t.x", data=n) for n in range(3)]
    await transport.publish(sent)
    await wait_for(lambda: seen, 10)
    await subscription.stop()  # cancels the handler; the 30 s lease must not matter
    collector = Collector()
    await transport.subscribe("g", collector)
    await collector.wait(3, timeout=10)
    assert [(m.id if m else None, a) for m, a in collector.received] == [
        (sent[0].id, 2),  # it reached a handler: that attempt counts
        (sent[1].id, 1),  # prefetched but never handled: not an attempt
        (sent[2].id, 1),
    ]


async def test_a_slow_handler_keeps_its_lease(transports: Callable[..., SqlTransport]) -> None:
    a, b = transports(lease=1.5), transports(lease=1.5)
    started, finished = asyncio.Event(), asyncio.Event()

    async def slow(delivery: Delivery) -> None:
        started.set()
        await asyncio.sleep(4.0)  # well past the lease: extending it must keep it here
        finished.set()

    await a.subscribe("g", slow)
    await a.publish([Message(type="t.slow")])
    await asyncio.wait_for(started.wait(), 10)
    other = Collector()
    await b.subscribe("g", other)
    await asyncio.wait_for(finished.wait(), 10)

    async def settled() -> bool:
        return await _count(a, queue_deliveries) == 0

    await wait_for(settled, 10)
    assert other.received == [], "the delivery was handed to a second consumer"


async def test_a_message_id_is_stored_once_while_its_row_lives(
    transports: Callable[..., SqlTransport],
) -> None:
    transport = transports()
    subscription = await transport.subscribe("g", Collector())
    await subscription.stop()
    message = Message(type="t.dup")
    await transport.publish([message, message])
    await transport.publish([message])
    assert await _count(transport, queue) == 1
    assert await _count(transport, queue_deliveries) == 1


async def test_messages_no_group_wants_are_not_stored(
    transports: Callable[..., SqlTransport],
) -> None:
    transport = transports()
    await transport.subscribe("matches", Collector(), topics=["match.*"])
    await transport.publish([Message(type="score.awarded"), Message(type="match.recorded")])
    assert await _count(transport, queue) == 1


async def test_unreachable_database_is_transport_unavailable() -> None:
    transport = SqlTransport("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(TransportUnavailable, match="unavailable"):
        await transport.connect()
    with pytest.raises(TransportUnavailable):
        await transport.publish([Message(type="t.x")])
    await transport.close()


@pytest.mark.postgres
async def test_a_rejected_batch_names_every_message(pg_url: str, channel: str) -> None:
    transport = SqlTransport(pg_url, channel=channel)
    try:
        await transport.subscribe("g", Collector())
        good = Envelope.of(Message(type="t.x"))
        # A key wider than the column (Message refuses it; an envelope does not check).
        bad = replace(Envelope.of(Message(type="t.x")), key="k" * 300)
        with pytest.raises(PublishError) as caught:
            await transport.publish_envelopes([good, bad])
        assert set(caught.value.failed) == {good.id, bad.id}  # one transaction: none stored
        assert not isinstance(caught.value.failed[good.id], TransportUnavailable)
        assert await _count(transport, queue) == 0
    finally:
        await transport.close()


def test_needs_exactly_one_of_url_and_database() -> None:
    with pytest.raises(ConfigurationError):
        SqlTransport()
    with pytest.raises(ConfigurationError):
        SqlTransport("sqlite:///x.db", database=Database("sqlite:///x.db"))


async def test_envelopes_are_stored_as_they_are_and_non_cloudevents_refused(
    transports: Callable[..., SqlTransport],
) -> None:
    transport = transports()
    collector = Collector()
    await transport.subscribe("g", collector)
    fine = Envelope.of(Message(type="t.fine", data={"a": 1}, key="k"))
    broken = Envelope("broken-1", "t.broken", None, {"ce-id": "broken-1"}, b"{}")
    with pytest.raises(PublishError) as caught:
        await transport.publish_envelopes([broken, fine])
    assert set(caught.value.failed) == {"broken-1"}
    assert "missing required attribute" in str(caught.value.failed["broken-1"])
    await collector.wait(1)
    assert collector.deliveries[0].body == fine.body
    assert collector.ids == [fine.id]


@pytest.mark.postgres
async def test_concurrent_first_subscribes_open_one_listener_and_leak_nothing(
    pg_url: str, channel: str
) -> None:
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transport = SqlTransport(pg_url, channel=channel, poll_interval=30)
        await transport.connect()
        await asyncio.gather(*(transport.subscribe(f"g{i}", Collector()) for i in range(4)))
        await transport.close()
        gc.collect()
    # An orphaned LISTEN connection is only reclaimed by the garbage collector,
    # which SQLAlchemy reports with this warning.
    leaks = [w for w in caught if "non-checked-in connection" in str(w.message)]
    assert leaks == []


async def test_a_failed_ack_flush_does_not_stop_the_consumer(sqlite_url: str, channel: str) -> None:
    from accord.errors import TransportError

    transport = SqlTransport(sqlite_url, channel=channel, poll_interval=0.05)
    await transport.connect()
    received = Collector()
    subscription = await transport.subscribe("g", received)
    assert isinstance(subscription, SqlSubscription)
    flush = subscription._flush_acks
    failures = []

    async def flaky_flush() -> None:
        if not failures:  # the database hiccups once while acks are committed
            failures.append(1)
            raise TransportError("committing acks failed (injected)")
        await flush()

    subscription._flush_acks = flaky_flush  # type: ignore[method-assign]
    await transport.publish([Message(type="t.one")])
    await received.wait(1)
    await transport.publish([Message(type="t.two")])
    await received.wait(2)
    assert failures == [1]
    await transport.close()


async def test_a_nack_in_a_batch_gives_back_the_later_deliveries_with_its_key(
    transports: Callable[..., SqlTransport],
) -> None:
    transport = transports()
    batches: list[list[tuple[str, int]]] = []

    async def handle(deliveries: Sequence[Delivery]) -> None:
        batches.append([(d.message.data, d.attempt) for d in deliveries if d.message])
        for delivery in deliveries:
            assert delivery.message is not None
            if delivery.message.data == "a1" and delivery.attempt == 1:
                await delivery.nack(0.05)

    await transport.subscribe_batches("g", handle, prefetch=10, max_batch=2)
    names = ["a1", "b1", "a2", "b2", "a3", "b3"]
    await transport.publish([Message(type="t.x", data=n, key=n[0]) for n in names])

    def all_handled() -> bool:
        return sum(len(b) for b in batches) >= len(names) + 1

    await wait_for(all_handled, 10)
    assert batches == [
        [("a1", 1), ("b1", 1)],
        [("b2", 1), ("b3", 1)],  # a2 and a3 went back: they wait for a1
        [("a1", 2), ("a2", 1)],  # given back unhandled: not an attempt
        [("a3", 1)],
    ]


async def test_a_slow_batch_keeps_the_lease_of_every_delivery_in_it(
    transports: Callable[..., SqlTransport],
) -> None:
    a, b = transports(lease=1.5), transports(lease=1.5)
    started, finished = asyncio.Event(), asyncio.Event()
    sizes: list[int] = []

    async def slow(deliveries: Sequence[Delivery]) -> None:
        sizes.append(len(deliveries))
        started.set()
        await asyncio.sleep(4.0)  # well past the lease: extending it must keep them all here
        finished.set()

    await a.subscribe_batches("g", slow, max_batch=3)
    await a.publish([Message(type="t.slow", data=n) for n in range(3)])
    await asyncio.wait_for(started.wait(), 10)
    other = Collector()
    await b.subscribe("g", other)
    await asyncio.wait_for(finished.wait(), 10)

    async def settled() -> bool:
        return await _count(a, queue_deliveries) == 0

    await wait_for(settled, 10)
    assert sizes == [3]
    assert other.received == [], "a delivery of the batch was handed to a second consumer"


async def test_a_stale_ack_on_sqlite_never_deletes_a_later_message(
    tmp_path: Path,
) -> None:
    """1. consumer A claims X and stalls (its event loop blocked: no lease extension);
    2. the lease runs out, consumer B claims X, handles and acks it;
    3. cleanup() deletes X's row, the newest; Y is published;
    4. A finishes and acks X.
    Y is still delivered: it did not get X's seq (SQLite reuses the highest rowid
    unless the table is AUTOINCREMENT), and an ack only deletes a delivery its
    consumer still holds. Before, A's ack deleted Y's delivery."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'queue.db'}"
    channel = f"stale-{uuid.uuid4().hex[:8]}"
    lease = 1.0
    main = SqlTransport(url, channel=channel, poll_interval=0.05, lease=lease)
    await main.connect()
    registration = await main.subscribe("g", _never_called)
    await registration.stop()  # the group is durable now

    a_ready, a_got, a_release, a_done = (threading.Event() for _ in range(4))
    a_seq: list[int] = []
    a_ids: list[str] = []  # what A handled (it may take Y itself once it wakes)

    def consumer_a() -> None:
        async def run() -> None:
            transport = SqlTransport(url, channel=channel, poll_interval=0.05, lease=lease)
            await transport.connect()

            async def stall(delivery: Delivery) -> None:
                assert hasattr(delivery, "seq")
                a_seq.append(delivery.seq)
                if delivery.message is not None:
                    a_ids.append(delivery.message.id)
                a_got.set()
                a_release.wait(30)  # blocks this loop: the lease is not extended

            await transport.subscribe("g", stall)
            a_ready.set()
            await asyncio.to_thread(a_done.wait, 60)
            await transport.close()

        asyncio.run(run())

    thread = threading.Thread(target=consumer_a, daemon=True)
    thread.start()
    try:
        assert await asyncio.to_thread(a_ready.wait, 15)
        x = Message(type="review.x")
        await main.publish([x])
        assert await asyncio.to_thread(a_got.wait, 15)
        await asyncio.sleep(lease + 0.5)  # A's lease has run out

        b_got: list[tuple[str, int]] = []

        async def take_over(delivery: Delivery) -> None:
            assert delivery.message is not None
            b_got.append((delivery.message.id, delivery.attempt))

        b = await main.subscribe("g", take_over)
        await wait_for(lambda: bool(b_got), 10.0)
        assert b_got[0] == (x.id, 2)
        await b.stop()  # commits B's ack
        assert await main.cleanup() == 1  # X's row is gone

        y = Message(type="review.y")
        await main.publish([y])
        async with main.database.connect() as conn:
            y_seq = await conn.scalar(
                sa.select(sa.func.max(queue_deliveries.c.seq)).where(
                    queue_deliveries.c.channel == channel
                )
            )
        assert y_seq != a_seq[0], "Y got X's seq"

        a_release.set()  # A wakes up and acks its stale delivery of X
        await asyncio.sleep(1.0)
        a_done.set()
        await asyncio.to_thread(thread.join, 15)

        c_got: list[str] = []

        async def late(delivery: Delivery) -> None:
            assert delivery.message is not None
            c_got.append(delivery.message.id)

        await main.subscribe("g", late)
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: y.id in c_got + a_ids, 5.0)
        assert y.id in c_got + a_ids, "Y never reached group g: A's stale ack deleted it"
    finally:
        a_release.set()
        a_done.set()
        await main.close()


async def _never_called(delivery: Delivery) -> None:
    raise AssertionError("no delivery expected")


async def test_on_sqlite_an_idle_consumer_never_holds_the_write_lock(
    sqlite_url: str, channel: str
) -> None:
    """An idle consumer's polls look through a read: another writer of the file,
    which does not wait at all (busy timeout 0), never finds the lock taken."""
    transport = SqlTransport(sqlite_url, channel=channel, poll_interval=0.001)
    await transport.connect()
    received = Collector()
    await transport.subscribe("g", received)
    path = sa.make_url(sqlite_url).database
    assert path

    def write_for_a_while() -> tuple[int, int]:
        conn = sqlite3.connect(path, timeout=0, isolation_level=None)
        tries = locked = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            tries += 1
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("COMMIT")
            except sqlite3.OperationalError:  # database is locked
                locked += 1
            time.sleep(0.0005)
        conn.close()
        return tries, locked

    try:
        tries, locked = await asyncio.to_thread(write_for_a_while)
        assert tries > 100 and locked == 0
        await transport.publish([Message(type="t.after")])  # and it still consumes
        await received.wait(1)
    finally:
        await transport.close()
