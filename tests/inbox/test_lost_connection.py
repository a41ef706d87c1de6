"""A handler's connection cut off by the server (what a restart or a failover does to
every session; here ``pg_terminate_backend`` does it to one) is the database's outage,
not a failure of the message: the message is not dead-lettered for it, even at its last
attempt, and is applied once the database answers. A handler's own connection error
(a refused HTTP call) still is its failure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.inbox import Consumer, DeadLetters, HandlerContext
from accord.messages import Message
from accord.testing import wait_for
from tests.inbox.conftest import Broker, create_business_tables, effect_counts, effects, unique

pytestmark = pytest.mark.postgres

KINDS = ["sql", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]


@pytest.fixture(params=KINDS)
async def pg_broker(request: pytest.FixtureRequest, pg_url: str) -> Any:
    made = Broker(request.param, pg_url)
    yield made
    await made.close()


@pytest.mark.parametrize("batch_size", [1, 8])
async def test_a_handler_whose_connection_the_server_cuts_off_is_retried_not_dead_lettered(
    pg_url: str, pg_broker: Broker, consumers: Callable[..., Consumer], batch_size: int
) -> None:
    database = Database(pg_url)
    await create_business_tables(database)
    # One attempt: any failure that counted would dead-letter the message at once.
    consumer = consumers(
        unique(), database, pg_broker.transport(), max_attempts=1, batch_size=batch_size
    )
    cut_off = 0

    @consumer.handler("test.cut")
    async def apply(ctx: HandlerContext, data: Any) -> None:
        nonlocal cut_off
        if cut_off < 2:  # the batch's try and the one-at-a-time try after it
            cut_off += 1
            await ctx.conn.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id, value=1))

    await consumer.start()
    message = Message(type="test.cut")
    await pg_broker.publish(message)

    async def applied() -> dict[str, int]:
        return await effect_counts(database)

    try:
        assert await wait_for(applied, 15) == {message.id: 1}
        assert cut_off >= 1
        assert await DeadLetters(database).list(consumer.name) == []
    finally:
        await consumer.stop()
        await database.dispose()


async def test_a_handlers_own_connection_error_still_counts_as_its_failure(
    pg_url: str, pg_broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    database = Database(pg_url)
    consumer = consumers(unique(), database, pg_broker.transport(), max_attempts=1)

    @consumer.handler("test.call")
    async def call(ctx: HandlerContext, data: Any) -> None:
        raise ConnectionRefusedError(111, "the pricing service refused")

    await consumer.start()
    await pg_broker.publish(Message(type="test.call"))

    async def dead() -> list[Any]:
        return await DeadLetters(database).list(consumer.name)

    try:
        letters = await wait_for(dead, 15)
        assert "ConnectionRefusedError" in letters[0].reason
    finally:
        await consumer.stop()
        await database.dispose()


async def test_retries_while_the_database_is_away_do_not_use_up_the_messages_attempts(
    pg_url: str, pg_broker: Broker, consumers: Callable[..., Consumer]
) -> None:
    """Deliveries that failed because the database was away are not the message's
    attempts: its first real failure afterwards is retried, not dead-lettered (the
    broker's count had grown with every outage retry)."""
    database = Database(pg_url)
    await create_business_tables(database)
    consumer = consumers(unique(), database, pg_broker.transport(), max_attempts=2)
    calls = 0

    @consumer.handler("test.outage")
    async def apply(ctx: HandlerContext, data: Any) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:  # the database away for three deliveries
            await ctx.conn.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
        elif calls == 4:
            raise ValueError("a real failure, once")
        await ctx.conn.execute(effects.insert().values(message_id=ctx.message.id, value=1))

    await consumer.start()
    message = Message(type="test.outage")
    await pg_broker.publish(message)

    async def applied() -> dict[str, int]:
        return await effect_counts(database)

    try:
        assert await wait_for(applied, 20) == {message.id: 1}
        assert calls == 5
        assert await DeadLetters(database).list(consumer.name) == []
    finally:
        await consumer.stop()
        await database.dispose()
