"""Inbox retention: a running consumer deletes its own inbox rows older than
``inbox_retention``, a batch at a time; another consumer's rows and recent rows stay,
and with ``None`` every row does. ``Inbox.prune`` goes in batches too. On SQLite and
PostgreSQL, the consumers over the SQL transport."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import inbox, inbox_holds, inbox_starts
from accord.errors import ConfigurationError
from accord.inbox import Consumer, HandlerContext, Inbox
from accord.inbox._store import PRUNE_BATCH
from accord.messages import Message
from accord.testing import wait_for
from accord.transports.sql import SqlTransport

OLD = timedelta(days=8)


async def seed(database: Database, consumer: str, count: int, age: timedelta) -> list[str]:
    """``count`` inbox rows of ``consumer`` processed ``age`` ago; their ids."""
    at = datetime.now(UTC) - age
    ids = [f"{consumer}-{uuid.uuid4().hex}" for _ in range(count)]
    rows = [{"consumer": consumer, "message_id": i, "processed_at": at} for i in ids]
    async with database.transaction() as conn:
        await conn.execute(inbox.insert(), rows)
    return ids


async def left(database: Database, consumer: str) -> set[str]:
    query = sa.select(inbox.c.message_id).where(inbox.c.consumer == consumer)
    async with database.connect() as conn:
        return set((await conn.execute(query)).scalars().all())


async def noted(database: Database, consumer: str) -> dict[str, set[str]]:
    """The holds and starts rows of ``consumer`` by table."""
    found = {}
    async with database.connect() as conn:
        for table in (inbox_holds, inbox_starts):
            query = sa.select(table.c.message_id).where(table.c.consumer == consumer)
            found[table.name] = set((await conn.execute(query)).scalars().all())
    return found


async def note_old_and_new(database: Database, consumer: str) -> None:
    """A hold and a start noted ``OLD`` ago and one of each just now."""
    now = datetime.now(UTC)
    async with database.transaction() as conn:
        for age, name in ((OLD, "old"), (timedelta(0), "new")):
            await conn.execute(
                inbox_holds.insert().values(
                    consumer=consumer, message_id=name, holds=1, held_at=now - age
                )
            )
            await conn.execute(
                inbox_starts.insert().values(
                    consumer=consumer, message_id=name, starts=1, started_at=now - age
                )
            )


async def test_prune_goes_in_batches_and_keeps_recent_rows(database: Database) -> None:
    await database.upgrade()
    old_a = await seed(database, "a", 7, OLD)
    recent_a = await seed(database, "a", 2, timedelta(hours=1))
    old_b = await seed(database, "b", 3, OLD)
    await note_old_and_new(database, "a")
    seen: list[int] = []
    assert await Inbox(database).prune(
        timedelta(days=7), "a", batch=3, on_batch=seen.append
    ) == len(old_a)
    assert seen == [3, 6, 7]  # how many so far, after each batch
    assert await left(database, "a") == set(recent_a)
    assert await left(database, "b") == set(old_b)
    assert await noted(database, "a") == {
        "accord_inbox_holds": {"new"},
        "accord_inbox_starts": {"new"},
    }
    assert await Inbox(database).prune(timedelta(days=7), batch=2) == len(old_b)  # every consumer
    assert await left(database, "b") == set()
    assert await left(database, "a") == set(recent_a)


def consumer_for(database: Database, name: str, **options: object) -> tuple[Consumer, list[str]]:
    """A consumer of its own channel whose handler notes each message id."""
    transport = SqlTransport(database.url, channel=f"c{uuid.uuid4().hex[:8]}", poll_interval=0.05)
    consumer = Consumer(name, database, transport, replay_interval=0.05, **options)  # type: ignore[arg-type]
    applied: list[str] = []

    @consumer.handler("test.retained")
    async def on_message(ctx: HandlerContext, data: object) -> None:
        applied.append(ctx.message.id)

    return consumer, applied


async def test_a_running_consumer_prunes_its_own_old_rows(database: Database) -> None:
    """More old rows than one batch: the consumer goes on at once after a full batch
    (not ten minutes later) until they are gone; its recent rows, what it applies
    meanwhile and another consumer's old rows stay."""
    await database.upgrade()
    await seed(database, "mine", PRUNE_BATCH + 3, OLD)
    recent = await seed(database, "mine", 2, timedelta(days=6))
    theirs = await seed(database, "theirs", 3, OLD)
    await note_old_and_new(database, "mine")
    consumer, applied = consumer_for(database, "mine")
    await consumer.start()
    try:
        message = Message(type="test.retained", data={})
        await consumer.transport.publish([message])
        await wait_for(lambda: applied == [message.id], timeout=20)

        async def pruned() -> bool:
            return await left(database, "mine") == {*recent, message.id}

        await wait_for(pruned, timeout=30)
        assert await left(database, "theirs") == set(theirs)
        assert await noted(database, "mine") == {
            "accord_inbox_holds": {"new"},
            "accord_inbox_starts": {"new"},
        }
    finally:
        await consumer.stop()
        await consumer.transport.close()


async def test_no_retention_keeps_every_row(database: Database) -> None:
    await database.upgrade()
    old = await seed(database, "keeper", 3, timedelta(days=400))
    consumer, _ = consumer_for(database, "keeper", inbox_retention=None)
    await consumer.start()
    try:
        await asyncio.sleep(0.5)  # ten turns of its replay loop, where pruning happens
        assert await left(database, "keeper") == set(old)
    finally:
        await consumer.stop()
        await consumer.transport.close()


async def test_a_prune_refuses_a_batch_below_one(database: Database) -> None:
    """A batch of 0 would return 0 rows for ever, never fewer than the batch: the
    prune would loop without end (on SQLite a negative one is no LIMIT at all)."""
    for batch in (0, -1):
        with pytest.raises(ConfigurationError, match=f"batch must be at least 1, got {batch}"):
            await Inbox(database).prune(timedelta(days=7), batch=batch)


@pytest.mark.parametrize(
    "retention", [timedelta(0), timedelta(days=-7), 7], ids=["zero", "negative", "an int"]
)
async def test_a_retention_that_is_no_positive_timedelta_is_refused(
    database: Database, retention: object
) -> None:
    """A retention of 0 or less deleted each inbox row as soon as it was written, so a
    redelivered message was applied twice; an int (days meant) failed every prune, in
    the log only, and nothing was ever pruned."""
    with pytest.raises(ConfigurationError, match="inbox_retention must be a positive timedelta"):
        Consumer("r", database, None, inbox_retention=retention)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("replay_interval", 0, "replay_interval must be a number of seconds, more than 0"),
        ("replay_lease", float("nan"), "replay_lease must be a number of seconds"),
        ("backoff_base", -1, "backoff_base must be a number of seconds, 0 or more"),
        ("prefetch", 0, "prefetch must be at least 1, got 0"),
        ("max_attempts", "5", "max_attempts must be a whole number, got '5'"),
        ("batch_size", 2.5, "batch_size must be a whole number, got 2.5"),
        ("max_deliveries", 30.5, "max_deliveries must be a whole number, 'auto' or None"),
    ],
)
async def test_consumer_options_that_would_misbehave_later_are_refused(
    database: Database, option: str, value: object, said: str
) -> None:
    """A replay interval of 0 polled the database without a pause; the others failed
    later, or as a TypeError."""
    with pytest.raises(ConfigurationError, match=said):
        Consumer("r", database, None, **{option: value})  # type: ignore[arg-type]
