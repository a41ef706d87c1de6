"""Consumer batch mode (``batch_size`` > 1): many deliveries in one transaction, on the
SQL transport (SQLite, PostgreSQL) and RabbitMQ."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from accord.db import Database
from accord.errors import ConfigurationError
from accord.inbox import Consumer, DeadLetters, HandlerContext, Inbox
from accord.messages import Message
from accord.testing import assert_eventually, wait_for
from accord.transports import from_url
from accord.transports.base import Transport
from tests.brokers import cleanup
from tests.conftest import NATS_URL, REDIS_URL
from tests.inbox.conftest import (
    Broker,
    effect_counts,
    effects,
    metric,
    settled_and_cleaned,
    unique,
)


@pytest.fixture
def consumer_defaults(consumer_defaults: dict[str, Any]) -> dict[str, Any]:
    return {**consumer_defaults, "batch_size": 32}


async def backlog(broker: Broker, consumer: Consumer, messages: Sequence[Message]) -> None:
    """Create the group, then publish ``messages`` while nobody consumes: the next start
    finds them waiting, so they arrive in batches."""
    await consumer.start()
    await consumer.stop()
    await broker.publish(*messages)


async def _effects_are(database: Database, expected: dict[str, int]) -> None:
    assert await effect_counts(database) == expected


def test_batch_size_must_be_positive(sqlite_url: str) -> None:
    with pytest.raises(ConfigurationError, match="batch_size must be at least 1, got 0"):
        Consumer("c", Database(sqlite_url), None, batch_size=0)  # type: ignore[arg-type]


async def test_a_backlog_is_applied_in_batches_once_each_in_order(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    name = unique()
    consumer = consumers(name, app_db, broker.transport(), prefetch=64)
    sizes: list[int] = []
    order: list[int] = []

    async def one(ctx: HandlerContext, data: Any) -> None:
        raise AssertionError("batch mode must use the batch function")

    async def many(items: Sequence[tuple[HandlerContext, Any]]) -> None:
        sizes.append(len(items))
        conns = {id(ctx.conn) for ctx, _ in items}
        assert len(conns) == 1, "one transaction per batch"
        for ctx, data in items:
            order.append(data["n"])
            await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))

    consumer.add_handler("test.scored", one, batch=many)
    messages = [Message(type="test.scored", data={"n": i}) for i in range(200)]
    await backlog(broker, consumer, messages)
    await consumer.start()

    await assert_eventually(lambda: _effects_are(app_db, {m.id: 1 for m in messages}))
    assert order == list(range(200))
    assert max(sizes) > 1 and max(sizes) <= 32
    assert len(sizes) < 200
    assert await Inbox(app_db).count(name) == {name: 200}
    handled = metric("accord_consumer_handled_total", consumer=name, type="test.scored")
    assert handled == 200


async def test_handlers_without_a_batch_function_share_the_transaction_and_skip_duplicates(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    name = unique()
    consumer = consumers(name, app_db, broker.transport())
    seen: list[str] = []

    @consumer.handler("test.scored")
    async def on_scored(ctx: HandlerContext, data: Any) -> None:
        seen.append(ctx.message.id)
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))

    first = [Message(type="test.scored", data={"n": i}) for i in range(20)]
    await backlog(broker, consumer, first)
    await consumer.start()
    await assert_eventually(lambda: _effects_are(app_db, {m.id: 1 for m in first}))
    # The same ids again, in a later backlog: every one is a duplicate now.
    await consumer.stop()
    seen.clear()
    await settled_and_cleaned(await broker.publisher(), 20)  # the SQL transport drops held ids
    await broker.publish(*first[:10])
    await consumer.start()
    await wait_for(
        lambda: metric("accord_consumer_duplicates_total", consumer=name, type="test.scored") >= 10
    )
    assert seen == []
    assert await effect_counts(app_db) == {m.id: 1 for m in first}


async def test_a_poison_message_fails_only_itself(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    name = unique()
    consumer = consumers(name, app_db, broker.transport(), max_attempts=2)

    @consumer.handler("test.scored")
    async def on_scored(ctx: HandlerContext, data: Any) -> None:
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))
        if data["n"] == 7:
            raise ValueError("seven is poison")

    messages = [Message(type="test.scored", data={"n": i}) for i in range(30)]
    await backlog(broker, consumer, messages)
    await consumer.start()

    [letter] = await wait_for(lambda: DeadLetters(app_db).list(name))
    assert letter.message_id == messages[7].id
    assert "ValueError: seven is poison" in letter.reason
    expected = {m.id: 1 for i, m in enumerate(messages) if i != 7}
    await assert_eventually(lambda: _effects_are(app_db, expected))
    assert not await Inbox(app_db).processed(name, messages[7].id)


async def test_after_commit_runs_once_per_committed_message_through_a_replayed_batch(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    # The poison message rolls its first batch back; that batch is then replayed one
    # message at a time. A callback registered in the rolled-back batch must not run.
    name = unique()
    consumer = consumers(name, app_db, broker.transport(), max_attempts=1)
    called: list[int] = []

    @consumer.handler("test.scored")
    async def on_scored(ctx: HandlerContext, data: Any) -> None:
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))
        ctx.after_commit(lambda: called.append(data["n"]))
        if data["n"] == 7:
            raise ValueError("seven is poison")

    messages = [Message(type="test.scored", data={"n": i}) for i in range(30)]
    await backlog(broker, consumer, messages)
    await consumer.start()

    await wait_for(lambda: DeadLetters(app_db).list(name))
    expected = {m.id: 1 for i, m in enumerate(messages) if i != 7}
    await assert_eventually(lambda: _effects_are(app_db, expected))
    assert sorted(called) == [i for i in range(30) if i != 7]


@pytest.fixture
async def sql_broker(db_url: str) -> AsyncIterator[Broker]:
    made = Broker("sql", db_url)
    yield made
    await made.close()


async def test_a_failed_message_is_not_overtaken_by_a_later_one_with_its_key(
    app_db: Database, sql_broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    # The SQL transport keeps per-key order within a group; batch mode must too.
    broker = sql_broker
    name = unique()
    consumer = consumers(name, app_db, broker.transport(), max_attempts=5)
    applied: list[str] = []

    @consumer.handler("test.scored")
    async def on_scored(ctx: HandlerContext, data: Any) -> None:
        if data["n"] == 0 and ctx.attempt < 3:
            raise RuntimeError("not yet")
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))
        applied.append(f"{ctx.message.key}:{data['n']}")

    keyed = [Message(type="test.scored", data={"n": i}, key="k") for i in range(3)]
    others = [Message(type="test.scored", data={"n": 10 + i}, key=f"o{i}") for i in range(5)]
    await backlog(broker, consumer, [keyed[0], *others[:2], keyed[1], *others[2:], keyed[2]])
    await consumer.start()

    everything = {m.id: 1 for m in [*keyed, *others]}
    await assert_eventually(lambda: _effects_are(app_db, everything), timeout=20)
    assert [a for a in applied if a.startswith("k:")] == ["k:0", "k:1", "k:2"]


@pytest.fixture(
    params=[
        pytest.param(NATS_URL, marks=pytest.mark.nats, id="nats"),
        pytest.param(REDIS_URL, marks=pytest.mark.redis, id="redis"),
    ]
)
async def timer_transports(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[[], Transport]]:
    """Make transports on one private channel of a broker that redelivers each nacked
    message on its own timer (no queue order among delayed messages); what they
    declared is deleted after the test."""
    channel = unique("held")
    made: list[Transport] = []

    def make() -> Transport:
        made.append(from_url(request.param, channel=channel))
        return made[-1]

    yield make
    await cleanup(made)


async def start_on_backlog(
    consumer: Consumer, publisher: Transport, messages: Sequence[Message]
) -> None:
    """Create the consumer's group, publish ``messages`` while nobody consumes, then
    start it: they arrive as one backlog, in batches."""
    await consumer.start()
    await consumer.stop()
    await publisher.connect()
    await publisher.publish(list(messages))
    await consumer.start()


async def test_held_back_messages_come_back_after_their_failed_predecessor_in_key_order(
    app_db: Database,
    timer_transports: Callable[[], Transport],
    consumers: Callable[..., Consumer],
) -> None:
    # k:0 fails once; k:1..k:4, in the same batch, are held back behind it. Each is
    # redelivered on its own timer, so only the delays they get keep them in order.
    consumer = consumers(unique(), app_db, timer_transports(), backoff_base=0.3, backoff_cap=0.3)
    applied: list[int] = []

    @consumer.handler("test.scored")
    async def on_scored(ctx: HandlerContext, data: Any) -> None:
        if data["n"] == 0 and ctx.attempt == 1:
            raise RuntimeError("not yet")
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))
        if ctx.message.key == "k":
            applied.append(data["n"])

    keyed = [Message(type="test.scored", data={"n": i}, key="k") for i in range(5)]
    others = [Message(type="test.scored", data={"n": 10 + i}, key=f"o{i}") for i in range(3)]
    await start_on_backlog(consumer, timer_transports(), [*keyed[:3], *others, *keyed[3:]])

    everything = {m.id: 1 for m in [*keyed, *others]}
    await assert_eventually(lambda: _effects_are(app_db, everything), timeout=20)
    assert applied == [0, 1, 2, 3, 4]


async def test_a_hold_is_not_a_failed_attempt(
    app_db: Database,
    timer_transports: Callable[[], Transport],
    consumers: Callable[..., Consumer],
) -> None:
    # max_attempts=2. k:0 fails on its first delivery, so k:1, in the same batch, is
    # held back behind it (the broker counts that redelivery). k:1 then fails on its
    # second delivery, its first failure: it must get another try and be applied,
    # not be dead-lettered as if the hold had been a failure.
    name = unique()
    consumer = consumers(name, app_db, timer_transports(), max_attempts=2)
    attempts: dict[int, list[int]] = {0: [], 1: []}

    @consumer.handler("test.scored")
    async def on_scored(ctx: HandlerContext, data: Any) -> None:
        n = data["n"]
        attempts[n].append(ctx.attempt)
        if ctx.attempt == n + 1:
            raise RuntimeError(f"k:{n} fails on delivery {ctx.attempt}")
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))

    keyed = [Message(type="test.scored", data={"n": i}, key="k") for i in range(2)]
    await start_on_backlog(consumer, timer_transports(), keyed)

    await assert_eventually(lambda: _effects_are(app_db, {m.id: 1 for m in keyed}), timeout=20)
    assert await DeadLetters(app_db).list(name) == []
    assert 1 not in attempts[1]  # held back, never run, on its first delivery
    assert attempts[1][-1] == 3


async def test_a_held_message_dead_lettered_and_replayed_gets_max_attempts_again(
    app_db: Database,
    timer_transports: Callable[[], Transport],
    consumers: Callable[..., Consumer],
) -> None:
    # k:1 is held back once behind k:0, then fails every time: it is dead-lettered
    # after 2 failures of its own (3 deliveries), and its dead letter says 2. Replayed,
    # it is tried exactly max_attempts times again: the hold does not carry over.
    name = unique()
    consumer = consumers(name, app_db, timer_transports(), max_attempts=2, replay_interval=0.1)
    runs: list[int] = []

    @consumer.handler("test.scored")
    async def on_scored(ctx: HandlerContext, data: Any) -> None:
        if data["n"] == 0 and ctx.attempt == 1:
            raise RuntimeError("k:0 fails once")
        if data["n"] == 1:
            runs.append(ctx.attempt)
            raise RuntimeError("k:1 always fails")
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))

    keyed = [Message(type="test.scored", data={"n": i}, key="k") for i in range(2)]
    await start_on_backlog(consumer, timer_transports(), keyed)

    letters = DeadLetters(app_db)
    [letter] = await wait_for(lambda: letters.list(name), timeout=20)
    assert letter.message_id == keyed[1].id
    assert letter.attempts == 2 and "failed 2 time(s)" in letter.reason
    assert 1 not in runs  # held back, never run, on its first delivery
    runs.clear()
    await letters.replay(letter.id)

    async def dead_again() -> bool:
        found = await letters.list(name, status="DEAD")
        return bool(found) and found[0].updated_at != letter.updated_at

    await wait_for(dead_again, timeout=20)
    assert runs == [1, 2]


async def test_bad_input_in_a_batch_is_dead_lettered_and_the_rest_of_the_batch_applied(
    app_db: Database, broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    name = unique()
    consumer = consumers(name, app_db, broker.transport())

    @consumer.handler("test.scored")
    async def on_scored(ctx: HandlerContext, data: Any) -> None:
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id))

    good = [Message(type="test.scored", data={"n": i}) for i in range(4)]
    await consumer.start()
    await consumer.stop()
    await broker.publish(good[0], good[1])
    await broker.publish_raw({"ce-type": "test.scored", "content-type": "application/json"}, b"{}")
    await broker.publish(good[2], good[3])
    await consumer.start()

    await assert_eventually(lambda: _effects_are(app_db, {m.id: 1 for m in good}))
    [letter] = await wait_for(lambda: DeadLetters(app_db).list(name))
    assert letter.kind == "undecodable" and "not a CloudEvent" in letter.reason
    assert await Inbox(app_db).count(name) == {name: 4}
