"""A message whose handler kills its process is never settled: once its handler was
started ``max_deliveries`` times it is dead-lettered before the next start, instead of
coming back for ever; the messages prefetched with it, whose handlers never started,
are not."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from accord.db import Database
from accord.errors import ConfigurationError
from accord.inbox import Consumer, DeadLetters
from accord.messages import Message
from accord.testing import wait_for
from accord.transports.base import Delivery
from accord.transports.sql import SqlTransport

# A consumer whose "test.kills" handler SIGKILLs its own process, as a segfault or
# the OOM killer would; "test.fine" is harmless.
CHILD = """
import asyncio, os, signal, sys
from accord.db import Database
from accord.inbox import Consumer
from accord.transports.sql import SqlTransport

async def main():
    url, channel = sys.argv[1], sys.argv[2]
    transport = SqlTransport(url, channel=channel, lease=0.5, poll_interval=0.05)
    consumer = Consumer("crasher", Database(url), transport, max_attempts=2, max_deliveries=3)

    @consumer.handler("test.kills")
    async def kills(ctx, data):
        print("handling", ctx.attempt, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    @consumer.handler("test.fine")
    async def fine(ctx, data):
        print("fine", ctx.attempt, flush=True)

    await consumer.start()
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def _ignore(_delivery: Delivery) -> None:
    raise AssertionError("no delivery expected")


Site = tuple[str, str, Database, SqlTransport]


@pytest.fixture
async def site(db_url: str) -> AsyncIterator[Site]:
    """A database (SQLite, then PostgreSQL), a channel of the SQL transport on it and
    the durable group "crasher" of the child consumer (so what is published is kept
    for it): (url, channel, database, transport)."""
    url = db_url
    channel = f"limit-{uuid.uuid4().hex[:8]}"
    database = Database(url)
    transport = SqlTransport(url, channel=channel)
    await transport.connect()
    group = await transport.subscribe("crasher", _ignore, topics=["test.kills", "test.fine"])
    await group.stop()
    yield url, channel, database, transport
    await transport.close()
    await database.dispose()


async def test_a_message_that_kills_its_consumer_is_dead_lettered_past_max_deliveries(
    site: Site,
) -> None:
    url, channel, database, transport = site
    poison = Message(type="test.kills", data={})
    await transport.publish([poison])

    handled: list[int] = []
    for restart in range(4):  # a supervisor restarting the consumer
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, url, channel, stdout=asyncio.subprocess.PIPE
        )
        assert child.stdout is not None
        try:
            assert (await asyncio.wait_for(child.stdout.readline(), 20)) == b"ready\n"
            if restart < 3:
                word, attempt = (await asyncio.wait_for(child.stdout.readline(), 10)).split()
                assert word == b"handling"
                handled.append(int(attempt))
                assert await asyncio.wait_for(child.wait(), 10) == -signal.SIGKILL
                continue
            # The fourth delivery is over the limit: dead-lettered, and the handler
            # (and so the process) is left alone.
            letters = await wait_for(lambda: DeadLetters(database).list("crasher"), 15)
            assert child.returncode is None
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
    assert handled == [1, 2, 3]
    assert [(d.message_id, d.kind, d.attempts) for d in letters] == [
        (poison.id, "delivery_limit", 3)  # its handler ran three times
    ]
    assert "max_deliveries=3" in letters[0].reason


async def test_max_deliveries_must_be_more_than_max_attempts(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    transport = SqlTransport(database.url, channel="x")
    assert Consumer("c", database, transport).max_deliveries == 20
    assert Consumer("c", database, transport, max_attempts=15).max_deliveries == 30
    assert Consumer("c", database, transport, max_deliveries=None).max_deliveries is None
    with pytest.raises(ConfigurationError, match="more than max_attempts"):
        Consumer("c", database, transport, max_attempts=5, max_deliveries=5)
    await database.dispose()


async def test_a_crash_loop_does_not_dead_letter_messages_that_never_reached_a_handler(
    site: Site,
) -> None:
    """The SQL transport counts an attempt for every delivery it claims (the whole
    prefetch), so a message prefetched behind one that kills the process is redelivered
    as often. Its handler never started, so it is not dead-lettered with the killer:
    it is handled once the killer is out of the way."""
    url, channel, database, transport = site
    poison = Message(type="test.kills", data={})
    innocent = Message(type="test.fine", data={})
    await transport.publish([poison, innocent])  # one claim takes both

    output = b""
    for restart in range(4):
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            url,
            channel,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None
        try:
            assert (await asyncio.wait_for(child.stdout.readline(), 20)) == b"ready\n"
            if restart < 3:
                line = await asyncio.wait_for(child.stdout.readline(), 10)
                assert line.startswith(b"handling")
                await asyncio.wait_for(child.wait(), 10)
                continue
            await wait_for(lambda: DeadLetters(database).list("crasher"), 15)
            await asyncio.sleep(2.0)  # the innocent message is next in the buffer
        finally:
            if child.returncode is None:
                child.kill()
            output = await child.stdout.read()
            await child.wait()
    letters = await DeadLetters(database).list("crasher")
    assert [(d.message_id, d.kind) for d in letters] == [(poison.id, "delivery_limit")], (
        "a message whose handler never ran was dead-lettered: "
        f"{[(d.message_id, d.kind, d.attempts) for d in letters]}"
    )
    assert b"fine" in output


async def test_a_database_not_yet_upgraded_still_handles_redeliveries(
    database: Database,
) -> None:
    """Without the starts table (the library upgraded, `accord db upgrade` not run yet)
    a redelivered message is still handled, not failed: its starts are not counted."""
    import sqlalchemy as sa

    from accord.testing import CapturedDelivery

    async with database.transaction() as conn:
        await conn.execute(sa.text("DROP TABLE accord_inbox_starts"))
    consumer = Consumer("old", database, SqlTransport(database=database, channel="old"))
    handled: list[int] = []

    @consumer.handler("test.fine")
    async def fine(ctx: Any, data: Any) -> None:
        handled.append(ctx.attempt)

    delivery = CapturedDelivery(Message(type="test.fine", data={}), 2)
    await consumer.handle(delivery)
    assert (handled, delivery.outcome) == ([2], "ack")
