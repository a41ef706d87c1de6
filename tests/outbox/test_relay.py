"""The relay against real brokers and both databases."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

import accord.outbox.relay as relay_module
from accord import Database, Message, add_to_outbox
from accord.db.schema import outbox
from accord.errors import ConfigurationError
from accord.eventstore import EventStore, NewEvent
from accord.outbox import OutboxAdmin, Relay
from accord.outbox.writer import stop_waking, wake_on_local_commits
from accord.testing import FaultyTransport, wait_for
from accord.transports import from_url
from tests.brokers import rabbit_max_message_size
from tests.outbox.conftest import broker_url, fast_relay, statuses

pytestmark = pytest.mark.rabbitmq


class Boom(Exception):
    pass


@pytest.mark.parametrize(
    "broker",
    [
        "sql",
        "rabbitmq",
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("redis", marks=pytest.mark.redis),
    ],
)
async def test_commit_publishes_once_and_rollback_publishes_nothing(
    database: Database, db_url: str, broker: str, listen: Any
) -> None:
    transport, received = await listen(broker_url(broker, db_url))
    committed = Message(type="order.placed", data={"n": 1})
    with pytest.raises(Boom):
        async with database.transaction() as conn:
            await add_to_outbox(conn, Message(type="order.placed", data={"n": 0}))
            raise Boom
    async with database.transaction() as conn:
        await add_to_outbox(conn, committed)

    relay = fast_relay(database, transport)
    assert await relay.run_once() == 1
    assert await relay.run_once() == 0
    await received.wait(1)
    await asyncio.sleep(0.5)
    assert received.ids == [committed.id]
    assert await statuses(database) == {committed.id: "SENT"}


async def test_poison_message_goes_dead_while_others_flow_and_replay_delivers(
    database: Database, listen: Any
) -> None:
    transport, received = await listen(broker_url("rabbitmq", ""))
    poison = Message(type="order.placed", data={"poison": True})
    good = [Message(type="order.placed", data={"n": i}) for i in range(20)]
    async with database.transaction() as conn:
        await add_to_outbox(conn, poison, *good)

    faulty = FaultyTransport(transport, fail_ids={poison.id})
    relay = fast_relay(database, faulty, max_attempts=3)
    task = asyncio.create_task(relay.run())
    try:

        async def poison_is_dead() -> bool:
            return (await statuses(database))[poison.id] == "DEAD"

        await wait_for(poison_is_dead, 15)
        await received.wait(20)
        assert sorted(received.ids) == sorted(m.id for m in good)

        admin = OutboxAdmin(database)
        [dead] = await admin.dead()
        assert dead["id"] == poison.id
        assert dead["retry_count"] == 3
        assert "broker refused the message" in dead["last_error"]
        assert (await admin.status()).dead == 1

        faulty.fail_ids.clear()  # the cause is fixed; the operator replays
        assert await admin.replay([poison.id]) == 1
        relay.wake()
        await received.wait(21)
        assert received.ids[-1] == poison.id

        async def poison_is_sent() -> bool:
            # The consumer can have it before the relay's settle commits.
            return (await statuses(database))[poison.id] == "SENT"

        await wait_for(poison_is_sent, 10)
    finally:
        await relay.stop()
        await task


async def test_a_message_larger_than_the_broker_takes_is_dead_at_once(
    database: Database, listen: Any
) -> None:
    """Over NATS (max_payload, 1 MiB by default): the row over the limit is DEAD after
    its first attempt, with an error that names the setting, instead of spending
    every attempt; the rest of the batch goes out."""
    transport, received = await listen(broker_url("nats", ""))
    limit = transport._nc.max_payload  # type: ignore[attr-defined]
    big = Message(type="doc.stored", data={"pad": "x" * limit}, key="doc-0")
    rest = [Message(type="doc.stored", data={"n": n}, key=f"doc-{n}") for n in range(1, 4)]
    async with database.transaction() as conn:
        await add_to_outbox(conn, rest[0], big, *rest[1:])
    relay = fast_relay(database, transport, max_attempts=5)
    assert await relay.run_once() == len(rest)
    await received.wait(len(rest))
    assert sorted(received.ids) == sorted(m.id for m in rest)
    [dead] = await OutboxAdmin(database).dead()
    assert (dead["id"], dead["retry_count"]) == (big.id, 1)
    assert "MessageTooLarge" in dead["last_error"] and "max_payload" in dead["last_error"]


@pytest.mark.serial
async def test_a_message_larger_than_rabbitmq_is_set_to_take_is_dead_at_once(
    database: Database, listen: Any
) -> None:
    """RabbitMQ set below the transport's max_message_size closes the channel on the
    big row: it is DEAD after one attempt, and the rows sent after it in the batch go
    out in the next round without an attempt spent."""
    limit = 1024 * 1024
    async with rabbit_max_message_size(limit):
        transport, received = await listen(broker_url("rabbitmq", ""))
        big = Message(type="doc.stored", data={"pad": "x" * limit}, key="doc-0")
        rest = [Message(type="doc.stored", data={"n": n}, key=f"doc-{n}") for n in range(1, 4)]
        async with database.transaction() as conn:
            await add_to_outbox(conn, rest[0], big, *rest[1:])
        relay = fast_relay(database, transport, max_attempts=5)

        async def drained() -> bool:
            await relay.run_once()
            return set(received.ids) >= {m.id for m in rest}

        await wait_for(drained, 10, interval=0.1)
        [dead] = await OutboxAdmin(database).dead()
        assert (dead["id"], dead["retry_count"]) == (big.id, 1)
        assert "MessageTooLarge" in dead["last_error"]
        assert "max_message_size=1,048,576" in dead["last_error"]
        async with database.connect() as conn:
            query = sa.select(outbox.c.id, outbox.c.retry_count).where(
                outbox.c.id != uuid.UUID(big.id)
            )
            spent = dict((await conn.execute(query)).all())
        assert {str(k): v for k, v in spent.items()} == {m.id: 0 for m in rest}


async def test_a_key_waits_behind_an_earlier_message_in_backoff(
    database: Database, listen: Any
) -> None:
    transport, received = await listen(broker_url("rabbitmq", ""))
    blocked = [Message(type="score.changed", data={"n": i}, key="alice") for i in range(3)]
    free = [Message(type="score.changed", data={"n": i}, key="bob") for i in range(3)]
    async with database.transaction() as conn:
        await add_to_outbox(conn, blocked[0], free[0], blocked[1], free[1], blocked[2], free[2])

    faulty = FaultyTransport(transport, fail_ids={blocked[0].id})
    relay = fast_relay(database, faulty, max_attempts=100, backoff_base=2.0, backoff_cap=2.0)
    await relay.run_once()  # alice's first fails and goes into backoff (1-2 s)
    faulty.fail_ids.clear()
    for _ in range(3):  # rounds while alice's first still waits in backoff
        await relay.run_once()
    await received.wait(3)
    await asyncio.sleep(0.3)
    # bob's messages flowed; none of alice's overtook her first.
    assert received.ids == [m.id for m in free]

    async def drained() -> bool:
        await relay.run_once()
        return len(received.ids) == 6

    await wait_for(drained, 10, interval=0.1)
    assert received.ids[3:] == [m.id for m in blocked]


async def test_broker_outage_does_not_spend_attempts(database: Database) -> None:
    unreachable = from_url("amqp://guest:guest@127.0.0.1:1/", channel="nowhere")
    message = Message(type="order.placed")
    async with database.transaction() as conn:
        await add_to_outbox(conn, message)
    relay = fast_relay(database, unreachable, max_attempts=1)
    for _ in range(3):
        assert await relay.run_once() == 0
    async with database.connect() as conn:
        row = (await conn.execute(sa.select(outbox))).one()
    assert row.status == "PENDING"
    assert row.retry_count == 0
    assert "unavailable" in row.last_error
    await unreachable.close()


async def test_old_sent_rows_are_cleaned_up_in_batches(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old SENT rows go, batch after batch (here 5 a batch, so 12 take three);
    recent and PENDING rows stay."""
    monkeypatch.setattr(relay_module, "_CLEANUP_BATCH", 5)
    async with database.transaction() as conn:
        await add_to_outbox(conn, *[Message(type="t.old") for _ in range(12)])
        await conn.execute(
            outbox.update().values(status="SENT", sent_at=datetime.now(UTC) - timedelta(days=8))
        )
        await add_to_outbox(conn, Message(type="t.recent"))
        await add_to_outbox(conn, Message(type="t.sent.recently"))
        await conn.execute(
            outbox.update()
            .where(outbox.c.event_type == "t.sent.recently")
            .values(status="SENT", sent_at=datetime.now(UTC) - timedelta(days=1))
        )
    relay = Relay(database, from_url("memory://"), retention=timedelta(days=7))
    assert await relay.cleanup() == 12
    assert sorted((await statuses(database)).values()) == ["PENDING", "SENT"]


async def _second_commit_wakes_the_relay(
    relay_db: Database, writer_db: Database, listened: Any
) -> None:
    """A message out, then a second added by ``writer_db``: with one round at a time and
    an hour between polls, only a wake-up on that commit brings it out in time."""
    transport, received = listened
    first, second = Message(type="order.placed"), Message(type="order.placed")
    async with writer_db.transaction() as conn:
        await add_to_outbox(conn, first)
    relay = Relay(relay_db, transport, poll_interval=3600, concurrency=1)
    task = asyncio.create_task(relay.run())
    try:
        await received.wait(1)
        async with writer_db.transaction() as conn:
            await add_to_outbox(conn, second)
        await received.wait(2, timeout=5)
        assert received.ids == [first.id, second.id]
    finally:
        await relay.stop()
        await task
        await relay_db.dispose()
        await writer_db.dispose()


@pytest.mark.postgres
async def test_commit_wakes_the_relay_through_notify(pg_url: str, listen: Any) -> None:
    database = Database(pg_url)
    await _second_commit_wakes_the_relay(
        database, database, await listen(broker_url("rabbitmq", ""))
    )


async def test_on_sqlite_a_commit_in_this_process_wakes_the_relay(
    sqlite_url: str, listen: Any
) -> None:
    """SQLite has no NOTIFY: a commit of this process that added outbox rows wakes the
    relays this process runs on that file, whatever Database the writer has and however
    its URL spells the file's path."""
    relative = _relative(sqlite_url)
    await _second_commit_wakes_the_relay(
        Database(sqlite_url), Database(relative), await listen(broker_url("sql", sqlite_url))
    )


async def test_on_sqlite_a_replay_wakes_the_relay(sqlite_url: str, listen: Any) -> None:
    database = Database(sqlite_url)
    transport, received = await listen(broker_url("sql", sqlite_url))
    first, dead = Message(type="order.placed"), Message(type="order.placed")
    async with database.transaction() as conn:
        await add_to_outbox(conn, dead)
        await conn.execute(outbox.update().values(status="DEAD", last_error="gave up"))
        await add_to_outbox(conn, first)
    relay = Relay(database, transport, poll_interval=3600, concurrency=1)
    task = asyncio.create_task(relay.run())
    try:
        await received.wait(1)  # its round is done: it sleeps for an hour
        assert await OutboxAdmin(database).replay([dead.id]) == 1
        await received.wait(2, timeout=5)
        assert received.ids == [first.id, dead.id]
    finally:
        await relay.stop()
        await task
        await database.dispose()


class CountingRelay(Relay):
    """A relay that records what each of its rounds published and how many rounds
    were ever busy at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[int] = []
        self.by: list[str] = []  # the task (round) that ran each
        self.busy = self.most_busy = 0

    async def run_once(self) -> int:
        task = asyncio.current_task()
        self.by.append(task.get_name() if task is not None else "")
        self.busy += 1
        self.most_busy = max(self.most_busy, self.busy)
        try:
            published = await super().run_once()
        finally:
            self.busy -= 1
        self.rounds.append(published)
        return published


async def test_a_wake_up_sends_one_round_to_look_and_a_full_batch_sends_another(
    database: Database, db_url: str, listen: Any
) -> None:
    """A commit wakes one of the relay's idle rounds, not each of them (the others
    would claim nothing, and on SQLite every claim takes the write lock); a round
    that found a full batch wakes another, so a backlog still goes out
    ``concurrency`` rounds at a time."""
    transport, received = await listen(broker_url("sql", db_url))
    relay = CountingRelay(database, transport, poll_interval=3600, concurrency=2, batch_size=10)
    task = asyncio.create_task(relay.run())
    try:
        await wait_for(lambda: len(relay.rounds) == 2)  # both looked once at start; now idle
        relay.most_busy = 0
        async with database.transaction() as conn:
            await add_to_outbox(conn, Message(type="order.placed"))
        await received.wait(1)
        await asyncio.sleep(0.3)
        assert relay.rounds[2:] == [1]
        assert relay.most_busy == 1

        async with database.transaction() as conn:
            await add_to_outbox(conn, *[Message(type="order.placed") for _ in range(60)])
        await received.wait(61, timeout=10)
        await wait_for(lambda: sum(relay.rounds) == 61)  # the last round has settled
        assert relay.most_busy == 2
    finally:
        await relay.stop()
        await task


async def test_an_idle_relay_looks_once_a_poll_whichever_round_is_free(
    database: Database, db_url: str, listen: Any
) -> None:
    """Every round polled on its own: ``concurrency`` claims per ``poll_interval`` with
    nothing to do. One round looks per poll now, and not only the first: a round busy
    for long (a slow broker) must not stop the others finding rows nothing announced."""

    class SlowFirstRound(CountingRelay):
        slow = False

        async def run_once(self) -> int:
            task = asyncio.current_task()
            if self.slow and task is not None and task.get_name().endswith("-round-0"):
                self.slow = False
                await asyncio.sleep(1.5)
            return await super().run_once()

    transport, _ = await listen(broker_url("sql", db_url))
    relay = SlowFirstRound(database, transport, poll_interval=0.1, concurrency=2, name="idle")
    task = asyncio.create_task(relay.run())
    try:
        await wait_for(lambda: len(relay.rounds) >= 2)
        started = len(relay.by)
        await asyncio.sleep(1.0)
        assert 3 <= len(relay.by) - started <= 10 + 3  # one a poll, not two

        relay.slow = True
        await wait_for(lambda: not relay.slow)  # round 0 is now busy for 1.5 s
        started = len(relay.by)
        await asyncio.sleep(1.0)
        assert {"idle-round-1"} == set(relay.by[started:])
        assert len(relay.by) - started >= 3
    finally:
        await relay.stop()
        await task


def _relative(sqlite_url: str) -> str:
    """The URL of the same file by a path relative to the working directory."""
    return "sqlite+aiosqlite:///" + os.path.relpath(make_url(sqlite_url).database or "")


async def test_a_relay_that_cannot_be_woken_never_fails_a_commit(sqlite_url: str) -> None:
    class Unreachable:  # a relay whose event loop is gone, say
        def committed(self) -> None:
            raise RuntimeError("Event loop is closed")

    database, relay = Database(sqlite_url), Unreachable()
    wake_on_local_commits(database.engine.url, relay)
    try:
        async with database.transaction() as conn:
            await add_to_outbox(conn, Message(type="t.committed"))
        assert list((await statuses(database)).values()) == ["PENDING"]
    finally:
        stop_waking(database.engine.url, relay)
        await database.dispose()


async def test_on_sqlite_an_idle_relay_does_not_wait_for_the_write_lock(
    sqlite_url: str, listen: Any
) -> None:
    """A round that finds nothing due (here: a message scheduled for later, and one
    added by a transaction not yet committed) looks without taking the file's write
    lock, so it neither waits for a writer nor holds one back."""
    database = Database(sqlite_url)
    transport, received = await listen(broker_url("sql", sqlite_url))
    relay = fast_relay(database, transport)
    try:
        async with database.transaction() as conn:
            await add_to_outbox(conn, Message(type="t.later"), delay=timedelta(hours=1))
        async with database.transaction() as writer:
            await add_to_outbox(writer, Message(type="t.now"))
            async with asyncio.timeout(5):  # not the 30 s busy timeout
                assert await relay.run_once() == 0
                assert await relay.run_once() == 0
        assert await relay.run_once() == 1  # committed now: due, and claimed
        await received.wait(1)
        assert [m.type for m, _ in received.received if m is not None] == ["t.now"]
    finally:
        await database.dispose()


class HeldAtPublish(FaultyTransport):
    """Holds every publish until the test releases it, so a batch is surely in flight."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.publishing = asyncio.Event()
        self.release = asyncio.Event()

    async def publish_envelopes(self, envelopes: Any) -> None:
        self.publishing.set()
        await self.release.wait()
        await super().publish_envelopes(envelopes)


async def test_stop_settles_the_batch_in_flight(database: Database, make_transport: Any) -> None:
    transport = make_transport(broker_url("rabbitmq", ""))
    await transport.connect()
    async with database.transaction() as conn:
        await add_to_outbox(conn, *[Message(type="t.flight") for _ in range(200)])
    held = HeldAtPublish(transport)
    relay = fast_relay(database, held, batch_size=50, concurrency=1)
    task = asyncio.create_task(relay.run())
    await asyncio.wait_for(held.publishing.wait(), 10)  # a batch of 50 is in flight
    stopping = asyncio.create_task(relay.stop())
    await asyncio.sleep(0)
    held.release.set()
    await asyncio.wait_for(stopping, 10)
    await asyncio.wait_for(task, 10)
    counts = list((await statuses(database)).values())
    assert counts.count("SENT") == 50, "the batch in flight is published and settled, no more"
    assert counts.count("PENDING") == 150
    async with database.connect() as conn:
        leased = await conn.scalar(
            sa.select(sa.func.count()).where(
                outbox.c.status == "PENDING", outbox.c.available_at > datetime.now(UTC)
            )
        )
    assert leased == 0, "stop must not leave rows leased"


async def test_a_row_that_is_not_a_message_is_dead_at_once(database: Database, listen: Any) -> None:
    transport, received = await listen(broker_url("rabbitmq", ""))
    corrupt, fine = Message(type="t.corrupt"), Message(type="t.fine")
    async with database.transaction() as conn:
        await add_to_outbox(conn, corrupt, fine)
        # Someone edited the row by hand and dropped a required attribute.
        await conn.execute(
            outbox.update()
            .where(outbox.c.event_type == "t.corrupt")
            .values(headers={"ce-id": corrupt.id, "ce-specversion": "1.0"})
        )
    relay = fast_relay(database, transport, max_attempts=10)
    assert await relay.run_once() == 1
    await received.wait(1)
    assert received.ids == [fine.id]
    [dead] = await OutboxAdmin(database).dead()
    assert dead["id"] == corrupt.id
    assert dead["retry_count"] == 1
    assert "missing required attribute" in dead["last_error"]


@pytest.mark.parametrize(
    "broker",
    [
        "sql",
        "rabbitmq",
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("redis", marks=pytest.mark.redis),
    ],
)
async def test_run_connects_a_transport_that_was_never_connected(
    database: Database, db_url: str, broker: str, make_transport: Any, listen: Any
) -> None:
    _, received = await listen(broker_url(broker, db_url))
    fresh = make_transport(broker_url(broker, db_url))  # not connected: run() must do it
    message = Message(type="order.placed")
    async with database.transaction() as conn:
        await add_to_outbox(conn, message)
    relay = fast_relay(database, fresh)
    task = asyncio.create_task(relay.run())
    try:
        await received.wait(1)
        assert received.ids == [message.id]
    finally:
        await relay.stop()
        await task


async def test_a_broker_lost_mid_batch_spends_no_attempts(database: Database, listen: Any) -> None:
    transport, received = await listen(broker_url("rabbitmq", ""))
    cut_off, delivered = Message(type="order.placed"), Message(type="order.placed")
    async with database.transaction() as conn:
        await add_to_outbox(conn, cut_off, delivered)
    faulty = FaultyTransport(transport, unavailable_ids={cut_off.id})
    relay = fast_relay(database, faulty, max_attempts=1)
    assert await relay.run_once() == 1
    await received.wait(1)
    async with database.connect() as conn:
        row = (await conn.execute(sa.select(outbox).where(outbox.c.event_type != ""))).all()
    by_id = {str(r.id): r for r in row}
    assert by_id[delivered.id].status == "SENT"
    assert by_id[cut_off.id].status == "PENDING", "an outage must never make a message DEAD"
    assert by_id[cut_off.id].retry_count == 0
    assert "unavailable" in by_id[cut_off.id].last_error


class ExplodesOnce(FaultyTransport):
    """A transport whose first publish raises something that is not an AccordError."""

    exploded = False

    async def publish_envelopes(self, envelopes: Any) -> None:
        if not self.exploded:
            self.exploded = True
            raise RuntimeError("a bug in somebody's transport")
        await super().publish_envelopes(envelopes)


async def test_an_unexpected_error_neither_kills_the_relay_nor_leaves_ghost_rounds(
    database: Database, listen: Any
) -> None:
    transport, received = await listen(broker_url("rabbitmq", ""))
    message = Message(type="order.placed")
    async with database.transaction() as conn:
        await add_to_outbox(conn, message)
    relay = fast_relay(database, ExplodesOnce(transport), lease=0.5, concurrency=2)
    task = asyncio.create_task(relay.run())
    await received.wait(1)  # the leased row came back after the lease and went out
    assert received.ids == [message.id]
    await relay.stop()
    await asyncio.wait_for(task, 5)
    rounds = [t for t in asyncio.all_tasks() if t.get_name().startswith(relay.name)]
    assert rounds == [], "a relay round outlived run()"


async def test_stop_before_run_is_not_forgotten(database: Database) -> None:
    relay = Relay(database, from_url("memory://"), poll_interval=3600)
    await relay.stop()
    await asyncio.wait_for(relay.run(), 5)


class StalledBroker(FaultyTransport):
    """A real transport whose first publish is held back until ``release`` is set, as
    a broker under flow control holds its confirms; the ids in ``fail_ids`` fail."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.publishing = asyncio.Event()
        self.release = asyncio.Event()
        self.published: list[str] = []

    async def publish_envelopes(self, envelopes: Any) -> None:
        if not self.publishing.is_set():
            self.publishing.set()
            await self.release.wait()
        self.published.extend(e.id for e in envelopes if e.id not in self.fail_ids)
        await super().publish_envelopes(envelopes)


@pytest.mark.postgres
@pytest.mark.serial  # reads the event store: a transaction open elsewhere hides the event
@pytest.mark.parametrize("claims", ["lock", "lease"])
async def test_lease_claims_hold_no_transaction_open_while_the_broker_confirms(
    pg_url: str, claims: str, listen: Any
) -> None:
    """With locks, a batch's transaction stays open while the broker confirms, and it
    holds the event store's gap-safe readers back (xmin is server-wide); with leases
    nothing is open, readers see new events at once, and the batch is still nobody
    else's to publish."""
    database = Database(pg_url)
    store = EventStore(database)
    transport, received = await listen(broker_url("rabbitmq", ""))
    message = Message(type="order.placed", data={"n": 1})
    async with database.transaction() as conn:
        await add_to_outbox(conn, message)
    stalled = StalledBroker(transport)
    relay = fast_relay(database, stalled, claims=claims)
    round_ = asyncio.create_task(relay.run_once())
    try:
        await asyncio.wait_for(stalled.publishing.wait(), 10)
        assert await fast_relay(database, transport, claims=claims).run_once() == 0
        await store.append("orders-1", [NewEvent("order.placed", {"n": 1})])
        visible = [e.stream_id for e in await store.read_all(0)]
        assert visible == ([] if claims == "lock" else ["orders-1"])
    finally:
        stalled.release.set()
        published = await round_
    assert published == 1
    await received.wait(1)
    await asyncio.sleep(0.3)  # room for a duplicate to show up
    assert received.ids == [message.id]
    assert await statuses(database) == {message.id: "SENT"}
    assert [e.stream_id for e in await store.read_all(0)] == ["orders-1"]
    await store.close()
    await database.dispose()


async def test_a_cancelled_leased_round_gives_its_rows_back_at_once(
    database: Database, listen: Any
) -> None:
    """A relay torn down while the broker holds its publish (its task cancelled)
    does not leave the batch leased for ``lease`` seconds: the next relay sends it
    at once, attempts unchanged."""
    transport, received = await listen(broker_url("rabbitmq", ""))
    messages = [Message(type="order.placed", data={"n": i}, key="k") for i in range(3)]
    async with database.transaction() as conn:
        await add_to_outbox(conn, *messages)
    stalled = StalledBroker(transport)
    relay = fast_relay(database, stalled, claims="lease", lease=60)
    round_ = asyncio.create_task(relay.run_once())
    await asyncio.wait_for(stalled.publishing.wait(), 10)
    round_.cancel()
    with pytest.raises(asyncio.CancelledError):
        await round_
    async with database.connect() as conn:
        rows = (await conn.execute(sa.select(outbox.c.status, outbox.c.retry_count))).all()
    assert [(r.status, r.retry_count) for r in rows] == [("PENDING", 0)] * 3
    started = time.monotonic()
    assert await fast_relay(database, transport, claims="lease").run_once() == 3
    assert time.monotonic() - started < 10  # not the 60 s lease
    await received.wait(3)
    assert received.ids == [m.id for m in messages]


async def test_claims_are_checked(database: Database) -> None:
    with pytest.raises(ConfigurationError, match="'lock' or 'lease'"):
        Relay(database, from_url("memory://"), claims="hold")
    if database.is_sqlite:
        with pytest.raises(ConfigurationError, match="needs PostgreSQL"):
            Relay(database, from_url("memory://"), claims="lock")
    else:
        assert Relay(database, from_url("memory://")).claims == "lock"


async def test_a_late_settle_leaves_a_row_to_the_relay_that_claimed_it_since(
    database: Database, listen: Any
) -> None:
    """Relay A's lease runs out while its publish of the key's first message hangs;
    relay B claims and sends it. When A's publish then fails, A's settle must not
    touch the row (marking it DEAD would let the key's second message go out)."""
    transport, received = await listen(broker_url("rabbitmq", ""))
    first, second = (Message(type="score.changed", data={"n": i}, key="alice") for i in (1, 2))
    async with database.transaction() as conn:
        await add_to_outbox(conn, first, second)
    stalled = StalledBroker(transport)
    stalled.fail_ids.add(first.id)
    a = fast_relay(database, stalled, claims="lease", lease=0.3, batch_size=1, max_attempts=1)
    round_a = asyncio.create_task(a.run_once())
    await asyncio.wait_for(stalled.publishing.wait(), 10)
    await asyncio.sleep(0.5)  # A's lease runs out
    b = fast_relay(database, transport, claims="lease", batch_size=1)
    assert await b.run_once() == 1  # B has the first message now and sends it
    stalled.release.set()
    assert await round_a == 0
    assert await statuses(database) == {first.id: "SENT", second.id: "PENDING"}
    assert await b.run_once() == 1
    await received.wait(2)
    assert received.ids == [first.id, second.id]
    assert (await OutboxAdmin(database).status()).dead == 0


async def test_no_wave_goes_out_once_the_lease_ran_out(database: Database, listen: Any) -> None:
    """A batch holding a key's two messages publishes them in two waves; when the first
    wave outlasts the lease, the second is released rather than sent."""
    transport, received = await listen(broker_url("rabbitmq", ""))
    first, second = (Message(type="score.changed", data={"n": i}, key="bob") for i in (1, 2))
    async with database.transaction() as conn:
        await add_to_outbox(conn, first, second)
    stalled = StalledBroker(transport)
    relay = fast_relay(database, stalled, claims="lease", lease=0.3)
    round_ = asyncio.create_task(relay.run_once())
    await asyncio.wait_for(stalled.publishing.wait(), 10)
    await asyncio.sleep(0.5)
    stalled.release.set()
    assert await round_ == 1  # nobody claimed the first meanwhile: it is still ours to settle
    assert stalled.published == [first.id]
    assert await statuses(database) == {first.id: "SENT", second.id: "PENDING"}
    assert await relay.run_once() == 1
    await received.wait(2)
    assert received.ids == [first.id, second.id]


async def test_a_lease_must_be_positive(database: Database) -> None:
    with pytest.raises(ConfigurationError, match="positive number of seconds"):
        Relay(database, from_url("memory://"), claims="lease", lease=0)
