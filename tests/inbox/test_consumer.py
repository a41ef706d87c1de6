"""The idempotent consumer on SQLite and PostgreSQL, over the SQL transport and RabbitMQ."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from accord.db import Database
from accord.db.schema import inbox, outbox
from accord.errors import ConfigurationError
from accord.inbox import Consumer, DeadLetters, HandlerContext, Inbox
from accord.messages import Message, encode
from accord.testing import assert_eventually, wait_for
from accord.transports.sql import SqlTransport
from tests.inbox.conftest import (
    Broker,
    Captured,
    effect_counts,
    effects,
    metric,
    settled_and_cleaned,
    unique,
)


class Scored(BaseModel):
    n: int


def recording(consumer: Consumer, type: str = "test.scored", schema: Any = Scored) -> list[Any]:
    """Register a handler that writes one effect row per message; return its call log."""
    calls: list[Any] = []

    @consumer.handler(type, schema=schema)
    async def on_scored(ctx: HandlerContext, data: Any) -> None:
        calls.append(data)
        value = data.n if isinstance(data, Scored) else None
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id, value=value))

    return calls


async def dead_letters(database: Database, consumer: str) -> list[Any]:
    return list(await DeadLetters(database).list(consumer))


async def test_effects_apply_once_when_the_same_message_is_published_twice(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    name = unique()
    consumer = consumers(name, app_db, broker.transport())
    recording(consumer)
    await consumer.start()
    batch = [Message(type="test.scored", data={"n": i}) for i in range(10)]

    await broker.publish(*batch)
    await wait_for(
        lambda: metric("accord_consumer_handled_total", consumer=name, type="test.scored") >= 10
    )
    publisher = await broker.publisher()
    await settled_and_cleaned(publisher, 10)  # the SQL transport drops an id it still holds
    await broker.publish(*batch)

    await wait_for(
        lambda: metric("accord_consumer_duplicates_total", consumer=name, type="test.scored") >= 10
    )
    assert await effect_counts(app_db) == {m.id: 1 for m in batch}
    assert await Inbox(app_db).count(name) == {name: 10}
    assert await dead_letters(app_db, name) == []


async def _waiting_on_a_lock(database: Database) -> bool:
    async with database.connect() as conn:
        waiting = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


async def test_two_concurrent_deliveries_of_one_id_apply_once(
    app_db: Database, consumers: Callable[..., Consumer]
) -> None:
    # The first handler holds its transaction (and inbox row) open until the second
    # delivery of the same id is blocked behind it; then it commits.
    name = unique()
    consumer = consumers(name, app_db, SqlTransport(database=app_db, channel=unique("unused")))
    entered = asyncio.Event()
    release = asyncio.Event()
    calls: list[str] = []

    @consumer.handler("test.slow")
    async def on_slow(ctx: HandlerContext, data: Any) -> None:
        calls.append(ctx.message.id)
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))
        entered.set()
        await release.wait()

    message = Message(type="test.slow", data={})
    first, second = Captured(message), Captured(message, attempt=2)
    one = asyncio.create_task(consumer.handle(first))
    await asyncio.wait_for(entered.wait(), 10)
    two = asyncio.create_task(consumer.handle(second))
    if app_db.is_postgres:
        await wait_for(lambda: _waiting_on_a_lock(app_db))
    else:
        await asyncio.sleep(0.05)  # SQLite: the second waits on BEGIN IMMEDIATE anyway
    release.set()
    await asyncio.wait_for(asyncio.gather(one, two), 30)

    assert calls == [message.id]
    assert (first.outcome, second.outcome) == ("ack", "ack")
    assert await effect_counts(app_db) == {message.id: 1}
    assert metric("accord_consumer_duplicates_total", consumer=name, type="test.slow") == 1


async def test_a_relay_duplicate_is_applied_once(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    # The relay published a row, then died before marking it SENT: the next relay
    # publishes it again with the same id.
    from accord.outbox import Relay, add

    name = unique()
    consumer = consumers(name, app_db, broker.transport())
    recording(consumer)
    await consumer.start()
    message = Message(type="test.scored", data={"n": 7})
    async with app_db.transaction() as conn:
        await add(conn, message)
    publisher = await broker.publisher()
    relay = Relay(app_db, publisher)
    assert await relay.run_once() == 1
    await wait_for(
        lambda: metric("accord_consumer_handled_total", consumer=name, type="test.scored") >= 1
    )
    await settled_and_cleaned(publisher, 1)
    async with app_db.transaction() as conn:  # no mark-SENT, and the claim's lease ran out
        await conn.execute(
            outbox.update().values(
                status="PENDING",
                sent_at=None,
                available_at=datetime.now(UTC) - timedelta(seconds=1),
            )
        )
    assert await relay.run_once() == 1

    await wait_for(
        lambda: metric("accord_consumer_duplicates_total", consumer=name, type="test.scored") >= 1
    )
    assert await effect_counts(app_db) == {message.id: 1}


async def test_a_failing_handler_is_retried_then_dead_lettered_with_its_error(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    name = unique()
    consumer = consumers(name, app_db, broker.transport(), max_attempts=3)
    attempts: list[int] = []
    recording(consumer, "test.ok")

    @consumer.handler("test.poison")
    async def on_poison(ctx: HandlerContext, data: Any) -> None:
        attempts.append(ctx.attempt)
        raise ValueError(f"cannot score {data['n']}")

    @consumer.handler("test.flaky")
    async def on_flaky(ctx: HandlerContext, data: Any) -> None:
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))
        if ctx.attempt < 3:
            raise RuntimeError("not yet")

    await consumer.start()
    poison = Message(type="test.poison", data={"n": 13})
    flaky = Message(type="test.flaky", data={})
    good = [Message(type="test.ok", data={"n": i}) for i in range(5)]
    await broker.publish(poison, flaky, *good)

    async def dead() -> list[Any]:
        return await dead_letters(app_db, name)

    [letter] = await wait_for(dead)
    assert attempts == [1, 2, 3]
    assert (letter.message_id, letter.kind, letter.attempts) == (poison.id, "handler_failed", 3)
    assert "handler failed 3 time(s); last error: ValueError: cannot score 13" in letter.reason
    assert "Traceback" in letter.reason and "on_poison" in letter.reason
    expected = {m.id: 1 for m in [*good, flaky]}
    await assert_eventually(lambda: _equal(effect_counts(app_db), expected))
    assert not await Inbox(app_db).processed(name, poison.id)


async def test_a_database_without_the_holds_table_still_retries_and_dead_letters(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    # A schema from before migration 2 (no `accord db upgrade` since): counting holds
    # is best effort; retries and dead letters must work as before.
    async with app_db.transaction() as conn:
        await conn.execute(sa.text("DROP TABLE accord_inbox_holds"))
    name = unique()
    consumer = consumers(name, app_db, broker.transport(), max_attempts=2)
    attempts: list[int] = []

    @consumer.handler("test.poison")
    async def on_poison(ctx: HandlerContext, data: Any) -> None:
        attempts.append(ctx.attempt)
        raise ValueError("never")

    await consumer.start()
    poison = Message(type="test.poison", data={})
    await broker.publish(poison)
    [letter] = await wait_for(lambda: dead_letters(app_db, name))
    assert attempts == [1, 2]
    assert (letter.message_id, letter.attempts) == (poison.id, 2)


async def _equal(value: Any, expected: Any) -> None:
    assert await value == expected


async def test_a_handler_that_raises_after_writing_leaves_no_effect_and_no_inbox_row(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    name = unique()
    consumer = consumers(name, app_db, broker.transport(), max_attempts=1)

    @consumer.handler("test.half")
    async def on_half(ctx: HandlerContext, data: Any) -> None:
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))
        await ctx.publish(Message(type="test.follow-up"))
        raise RuntimeError("failed after the write")

    await consumer.start()
    message = Message(type="test.half", data={})
    await broker.publish(message)

    [letter] = await wait_for(lambda: dead_letters(app_db, name))
    assert "RuntimeError: failed after the write" in letter.reason
    assert await effect_counts(app_db) == {}
    async with app_db.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(inbox)) == 0
        assert await conn.scalar(sa.select(sa.func.count()).select_from(outbox)) == 0


async def test_bad_input_is_dead_lettered_with_its_reason_and_good_messages_keep_flowing(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    name = unique()
    # An earlier deployment of this consumer also handled test.legacy: its binding /
    # group pattern is durable, so such messages still arrive after the handler went.
    old = consumers(name, app_db, broker.transport())
    recording(old)
    recording(old, "test.legacy", schema=None)
    await old.start()
    await old.stop()
    consumer = consumers(name, app_db, broker.transport())
    recording(consumer)
    await consumer.start()

    good = [Message(type="test.scored", data={"n": i}) for i in range(6)]
    headers, _ = encode(good[0].with_(id="bad-json"))
    await broker.publish(good[0])
    await broker.publish_raw(headers, b"\xff{not json")
    await broker.publish(good[1])
    await broker.publish_raw({"ce-type": "test.scored", "content-type": "application/json"}, b"{}")
    await broker.publish(good[2])
    unknown = Message(type="test.legacy", data={})
    await broker.publish(unknown, good[3])
    invalid = Message(type="test.scored", data={"n": "seven"})
    missing = Message(type="test.scored", data={"m": 1})
    await broker.publish(invalid, missing, good[4], good[5])

    await assert_eventually(lambda: _equal(effect_counts(app_db), {m.id: 1 for m in good}))
    letters = await wait_for(lambda: _at_least(dead_letters(app_db, name), 5))
    by_kind = {(letter.kind, letter.message_id): letter.reason for letter in letters}
    reason = by_kind[("undecodable", "bad-json")]
    assert "body is not valid JSON" in reason
    [not_ce] = [r for (k, i), r in by_kind.items() if k == "undecodable" and i != "bad-json"]
    assert "not a CloudEvent" in not_ce and "id" in not_ce
    assert "unknown message type 'test.legacy'" in by_kind[("unknown_type", unknown.id)]
    assert "data does not match Scored: field 'n'" in by_kind[("invalid_data", invalid.id)]
    assert "'seven'" in by_kind[("invalid_data", invalid.id)]
    assert "field 'n': Field required" in by_kind[("invalid_data", missing.id)]
    assert len(letters) == 5


async def _at_least(value: Any, n: int) -> Any:
    items = await value
    return items if len(items) >= n else None


async def test_replay_delivers_a_dead_letter_again_and_a_new_failure_is_dead_again(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    name = unique()
    consumer = consumers(name, app_db, broker.transport(), max_attempts=2)
    broken = {"now": True, "calls": 0}

    @consumer.handler("test.fixable")
    async def on_fixable(ctx: HandlerContext, data: Any) -> None:
        broken["calls"] += 1
        if broken["now"]:
            raise KeyError(f"broken {broken['calls']}")
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))

    await consumer.start()
    first, second = Message(type="test.fixable"), Message(type="test.fixable")
    await broker.publish(first, second)
    letters = await wait_for(lambda: _at_least(dead_letters(app_db, name), 2))
    by_message = {letter.message_id: letter for letter in letters}
    api = DeadLetters(app_db)

    # Still broken: the replay is dead again, with the new reason and attempts from 1.
    calls_before = broken["calls"]
    await api.replay(by_message[second.id].id)
    await assert_eventually(lambda: _check_dead_again(api, by_message[second.id].id))
    again = await api.get(by_message[second.id].id)
    assert broken["calls"] == calls_before + 2 and again.attempts == 2
    assert f"broken {broken['calls']}" in again.reason

    broken["now"] = False
    await consumer.stop()  # a consumer started again replays too
    await consumer.start()
    await api.replay(by_message[first.id].id)
    await assert_eventually(lambda: _equal(effect_counts(app_db), {first.id: 1}))
    await assert_eventually(lambda: _equal(_ids(api, name), [by_message[second.id].id]))
    assert await api.purge(name) == 1
    assert await dead_letters(app_db, name) == []


async def _check_dead_again(api: DeadLetters, letter_id: int) -> None:
    letter = await api.get(letter_id)
    assert letter.status == "DEAD" and letter.updated_at is not None
    assert letter.attempts == 2


async def _ids(api: DeadLetters, consumer: str) -> list[int]:
    return [letter.id for letter in await api.list(consumer)]


async def test_publish_from_a_handler_goes_to_the_outbox_with_correlation(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    name = unique()
    consumer = consumers(name, app_db, broker.transport())

    @consumer.handler("test.asked")
    async def on_asked(ctx: HandlerContext, data: Any) -> None:
        await ctx.publish(Message(type="test.answered", data={"to": data["q"]}))

    await consumer.start()
    asked = Message(
        type="test.asked",
        data={"q": 1},
        correlationid="corr-1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    await broker.publish(asked)

    async def answered() -> Any:
        async with app_db.connect() as conn:
            return (await conn.execute(sa.select(outbox.c.headers))).first()

    row = await wait_for(answered)
    headers = row.headers
    assert headers["ce-type"] == "test.answered"
    assert headers["ce-correlationid"] == "corr-1"
    assert headers["ce-causationid"] == asked.id
    assert headers["ce-traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


def idle_consumer(name: str, database: Database) -> Consumer:
    """A consumer on the SQL transport of ``database`` with one handler that does nothing."""
    consumer = Consumer(name, database, SqlTransport(database=database))

    @consumer.handler("t.any")
    async def handle(ctx: HandlerContext, data: Any) -> None:
        pass

    return consumer


async def test_stop_before_run_is_not_forgotten(sqlite_url: str) -> None:
    database = Database(sqlite_url)
    consumer = idle_consumer("early-stop", database)
    await consumer.stop()
    await asyncio.wait_for(consumer.run(), 5)
    await database.dispose()


async def test_a_stop_during_start_ends_the_replay_loop_it_started(sqlite_url: str) -> None:
    # stop() arrives while start() is connecting: the replay loop start() goes on to
    # create must see that stop, or stop() waits for it forever.
    database = Database(sqlite_url)
    consumer = idle_consumer("racing", database)
    async with asyncio.timeout(10):
        await asyncio.gather(consumer.start(), consumer.stop())
    await database.dispose()


async def test_a_stopping_consumer_gives_back_the_replays_it_did_not_begin(
    db_url: str,
) -> None:
    """A consumer claims up to 20 letters for replay at a time. Stopped while handling
    the first, it does not go on with the others: they are due again at once (for the
    next consumer), not after their lease."""
    from datetime import UTC, datetime

    from accord.testing import CapturedDelivery

    database = Database(db_url)
    await database.upgrade()
    transport = SqlTransport(database=database)
    consumer = Consumer("replays", database, transport, max_attempts=1)
    handled: list[str] = []
    stopping: list[asyncio.Task[None]] = []
    broken = True

    @consumer.handler("t.replay")
    async def handle(ctx: HandlerContext, data: Any) -> None:
        if broken:
            raise RuntimeError("broken")
        handled.append(ctx.message.id)
        if len(handled) == 1:
            stopping.append(asyncio.create_task(consumer.stop()))
            await asyncio.sleep(0.2)  # the stop is under way when this one ends

    for _ in range(3):
        await consumer.handle(CapturedDelivery(Message(type="t.replay", data={})))
    api = DeadLetters(database)
    letters = await api.list("replays")
    assert len(letters) == 3
    broken = False
    for letter in letters:
        await api.replay(letter.id)
    await consumer.start()
    await wait_for(lambda: stopping, 10)
    await asyncio.wait_for(stopping[0], 10)
    from accord.db.schema import dead_letters

    query = sa.select(dead_letters.c.status, dead_letters.c.available_at).where(
        dead_letters.c.consumer == "replays"
    )
    async with database.connect() as conn:
        left = (await conn.execute(query)).all()
    assert len(handled) == 1 and len(left) == 2
    now = datetime.now(UTC)
    assert all(status == "REPLAY" and due <= now for status, due in left), left
    await transport.close()
    await database.dispose()


@pytest.mark.parametrize(
    ("type", "said"),
    [
        ("", "'' is no message type"),
        ("t" * 201, "(201 characters) is no message type"),
        ("match.\x00recorded", "holds a control character"),
    ],
    ids=["empty", "too long", "control character"],
)
def test_a_handler_for_a_type_no_message_can_have_is_refused(
    sqlite_url: str, type: str, said: str
) -> None:
    """It was registered and subscribed, and never called."""
    consumer = Consumer("odd-types", Database(sqlite_url), None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=re.escape(said)):
        consumer.add_handler(type, _nothing)


async def _nothing(ctx: HandlerContext, data: Any) -> None:
    pass


async def test_a_handler_added_while_the_consumer_runs_is_refused(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    """Its group was subscribed for the types handled at start(): the new handler was
    never called, and the messages of its type never came (nor a dead letter)."""
    name = unique()
    consumer = consumers(name, app_db, broker.transport())
    recording(consumer, "test.scored")
    await consumer.start()
    with pytest.raises(ConfigurationError, match="is running: register the handler"):
        consumer.add_handler("test.later", _nothing)
    assert consumer.topics == ["test.scored"]
    await consumer.stop()
    late = recording(consumer, "test.later", schema=None)  # stopped: fine, taken at start
    await consumer.start()
    message = Message(type="test.later", data={})
    await broker.publish(message)
    await wait_for(lambda: late == [{}], timeout=10)
