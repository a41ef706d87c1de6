"""Relay tests run against real brokers: a fresh channel per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
from accord.outbox import Relay
from accord.testing import Collector
from accord.transports import Transport, from_url
from tests.brokers import cleanup
from tests.conftest import NATS_URL, RABBIT_URL, REDIS_URL

BROKERS = {
    "rabbitmq": RABBIT_URL,
    "nats": NATS_URL,
    "redis": REDIS_URL,
}


def broker_url(kind: str, db_url: str) -> str:
    """The URL of a real broker of this kind; the SQL transport shares the test database."""
    return db_url if kind == "sql" else BROKERS[kind]


@pytest.fixture
def channel() -> str:
    return f"relay-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def make_transport(channel: str) -> AsyncIterator[Callable[[str], Transport]]:
    """Open transports on this test's channel; all are closed at teardown."""
    opened: list[Transport] = []

    def make(url: str) -> Transport:
        transport = from_url(url, channel=channel)
        opened.append(transport)
        return transport

    yield make
    await cleanup(opened)


@pytest.fixture
def listen(make_transport: Callable[[str], Transport]) -> Callable[..., Any]:
    """``await listen(url)``: a connected transport on this test's channel and a
    Collector subscribed to it as group ``audit``."""

    async def start(url: str) -> tuple[Transport, Collector]:
        transport = make_transport(url)
        await transport.connect()
        received = Collector()
        await transport.subscribe("audit", received)
        return transport, received

    return start


def fast_relay(database: Database, transport: Any, **options: Any) -> Relay:
    """A relay that retries and polls in tens of milliseconds, for tests."""
    options.setdefault("backoff_base", 0.05)
    options.setdefault("backoff_cap", 0.2)
    options.setdefault("poll_interval", 0.05)
    return Relay(database, transport, **options)


async def statuses(database: Database) -> dict[str, str]:
    """Each outbox row's status, by message id."""
    async with database.connect() as conn:
        rows = (await conn.execute(sa.select(outbox.c.id, outbox.c.status))).all()
    return {str(r.id): r.status for r in rows}
