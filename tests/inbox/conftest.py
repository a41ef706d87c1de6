"""Fixtures for consumer tests: a business table on the consumer's database, and a real
broker (the SQL transport on that database, or RabbitMQ) on a channel of its own."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from accord.db import Database
from accord.db.types import BigId
from accord.inbox import Consumer
from accord.messages import Message
from accord.testing import CapturedDelivery, wait_for
from accord.transports.base import Transport
from accord.transports.sql import SqlTransport
from tests.brokers import delete_everything
from tests.conftest import RABBIT_URL

business = sa.MetaData()
effects = sa.Table(
    "inbox_test_effects",
    business,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(100), nullable=False),
    sa.Column("value", sa.Integer, nullable=True),
)


async def create_business_tables(database: Database) -> None:
    async with database.transaction() as conn:
        await conn.run_sync(lambda sync: business.create_all(sync, checkfirst=True))


async def effect_counts(database: Database) -> dict[str, int]:
    """message id -> how many effect rows it has."""
    query = sa.select(effects.c.message_id, sa.func.count()).group_by(effects.c.message_id)
    async with database.connect() as conn:
        return {str(k): int(v) for k, v in (await conn.execute(query)).all()}


def metric(name: str, **labels: str) -> float:
    """Current value of a counter sample (0 if never incremented)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


Captured = CapturedDelivery  # the name these tests grew up with


class Broker:
    """A real broker on a private channel: makes transports, publishes, cleans up."""

    def __init__(self, kind: str, db_url: str) -> None:
        self.kind = kind
        self.db_url = db_url
        self.channel = f"inbox-{uuid.uuid4().hex[:12]}"
        self.made: list[Transport] = []
        self._publisher: Transport | None = None
        #: Groups declared by other processes (a worker subprocess): deleted at
        #: close too, with those of the transports made here.
        self.groups: set[str] = set()

    def transport(self) -> Transport:
        """A new, unconnected transport on this broker's channel."""
        transport: Transport
        if self.kind == "sql":
            transport = SqlTransport(
                self.db_url, channel=self.channel, poll_interval=0.05, lease=3.0
            )
        else:
            from accord.transports.rabbitmq import RabbitTransport

            transport = RabbitTransport(RABBIT_URL, channel=self.channel)
        self.made.append(transport)
        return transport

    @property
    def url(self) -> str:
        """The broker URL a worker subprocess would be given."""
        return self.db_url if self.kind == "sql" else RABBIT_URL

    async def publisher(self) -> Transport:
        if self._publisher is None:
            self._publisher = self.transport()
            await self._publisher.connect()
        return self._publisher

    async def publish(self, *messages: Message) -> None:
        await (await self.publisher()).publish(list(messages))

    async def publish_raw(self, headers: Mapping[str, str], body: bytes) -> None:
        """Bytes as they are, bypassing Accord's encoding; routed by the ce-type header."""
        if self.kind == "sql":
            publisher = await self.publisher()
            assert isinstance(publisher, SqlTransport)
            await publisher.publish_raw(dict(headers), body)
            return
        import aio_pika

        from accord.transports.rabbitmq import RabbitTopology

        connection = await aio_pika.connect(RABBIT_URL)
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(
                RabbitTopology(self.channel).exchange, ensure=False
            )
            await exchange.publish(
                aio_pika.Message(body, headers=dict(headers)),
                routing_key=headers.get("ce-type", "raw"),
            )
        finally:
            await connection.close()

    async def close(self) -> None:
        groups: set[str] = set(self.groups)
        for transport in self.made:
            groups |= set(getattr(transport, "groups", ()))
            with contextlib.suppress(Exception):
                await transport.close()
        if self.kind == "rabbitmq":
            await delete_everything({self.channel: set(groups)})


@pytest.fixture(params=["sql", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def broker(request: pytest.FixtureRequest, db_url: str) -> AsyncIterator[Broker]:
    """A real broker: the SQL transport on the test database, or RabbitMQ."""
    made = Broker(request.param, db_url)
    yield made
    await made.close()


@pytest.fixture
async def app_db(database: Database) -> Database:
    """The consumer's database, with the test's business table."""
    await create_business_tables(database)
    return database


def unique(prefix: str = "consumer") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def settled_and_cleaned(transport: Any, count: int) -> None:
    """On the SQL transport, wait until ``count`` settled messages were cleaned up, so that
    publishing their ids again delivers them again (it drops ids it still holds)."""
    if not isinstance(transport, SqlTransport):
        return
    cleaned = 0

    async def all_cleaned() -> bool:
        nonlocal cleaned
        cleaned += await transport.cleanup()
        return cleaned >= count

    await wait_for(all_cleaned)


@pytest.fixture
def consumer_defaults() -> dict[str, Any]:
    """Keyword arguments every consumer made by ``consumers`` gets unless given."""
    return {"backoff_base": 0.02, "backoff_cap": 0.2, "replay_interval": 0.05}


@pytest.fixture
async def consumers(
    consumer_defaults: dict[str, Any],
) -> AsyncIterator[Callable[..., Consumer]]:
    """Make consumers; stop them after the test."""
    made: list[Consumer] = []

    def make(*args: Any, **kwargs: Any) -> Consumer:
        consumer = Consumer(*args, **{**consumer_defaults, **kwargs})
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        await consumer.stop()
