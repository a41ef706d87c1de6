"""A running saga system per test: relay, orchestrator and participants on a real broker
(the SQL transport on the test database, or RabbitMQ) and a real database."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from accord.db import Database
from accord.sagas import STATUSES, Orchestrator, Saga, SagaAdmin
from accord.testing import wait_for
from accord.transports.base import Transport
from tests.brokers import delete_everything
from tests.conftest import RABBIT_URL
from tests.sagas import app

TERMINAL = ("COMPLETED", "COMPENSATED", "STUCK", "ABORTED")
assert set(TERMINAL) <= set(STATUSES)


def make_transport(kind: str, db_url: str, channel: str) -> Transport:
    if kind == "sql":
        from accord.transports.sql import SqlTransport

        return SqlTransport(db_url, channel=channel, poll_interval=0.05, lease=3.0)
    from accord.transports.rabbitmq import RabbitTransport

    return RabbitTransport(RABBIT_URL, channel=channel)


def broker_url(kind: str, db_url: str) -> str:
    return db_url if kind == "sql" else RABBIT_URL


class World:
    """The trip saga's whole system in this process (some parts may run elsewhere)."""

    def __init__(self, database: Database, kind: str) -> None:
        self.database = database
        self.kind = kind
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.channel = f"sagas-{self.prefix}"
        self.transport = make_transport(kind, database.url, self.channel)
        self.admin = SagaAdmin(database)
        self.trip: Saga = app.make_trip()
        self.parts: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def groups(self) -> list[str]:
        return [f"{self.prefix}-{s}" for s in ("orch", "hotels", "cars")]

    async def start(self, trip: Saga | None = None, **which: bool) -> None:
        """Run the relay, orchestrator and participants (``orchestrator=False``...)."""
        if trip is not None:
            self.trip = trip
        await app.create_tables(self.database)
        await self.transport.connect()
        parts = app.components(
            self.database, self.transport, prefix=self.prefix, trip=self.trip, **which
        )
        await self.run_parts(parts)

    async def stop_participants(self) -> None:
        """Stop the participants' consumers (their groups stay: messages queue up)."""
        for part in list(self.parts):
            if getattr(part, "name", "").endswith(("-hotels", "-cars")):
                await part.stop()
                self.parts.remove(part)

    async def start_participants(self) -> None:
        await self.run_parts(app.participant_consumers(self.database, self.transport, self.prefix))

    async def run_parts(self, parts: list[Any]) -> None:
        for part in parts:
            self.parts.append(part)
            self._tasks.append(asyncio.create_task(part.run()))
        # Consumers subscribe in run(): let them be subscribed before sagas start.
        for part in parts:
            consumer = getattr(part, "consumer", part)
            if hasattr(consumer, "_subscription"):
                await wait_for(lambda c=consumer: c._subscription is not None, 10)

    def orchestrator(self) -> Orchestrator:
        """An orchestrator object for starting sagas (running or not)."""
        for part in self.parts:
            if isinstance(part, Orchestrator):
                return part
        return Orchestrator(self.database, self.transport, [self.trip], name=f"{self.prefix}-orch")

    async def begin(self, **data: Any) -> str:
        return await self.orchestrator().start(self.trip, data)

    async def status(self, saga_id: str) -> str:
        return (await self.admin.get(saga_id)).status

    async def wait_status(self, saga_id: str, *statuses: str, timeout: float = 20) -> str:
        async def reached() -> str | None:
            status = await self.status(saga_id)
            return status if status in (statuses or TERMINAL) else None

        return await wait_for(reached, timeout, interval=0.05)

    async def events(self, saga_id: str) -> list[tuple[int, str, str]]:
        return [(e.step, e.phase, e.event) for e in await self.admin.history(saga_id)]

    async def stop(self) -> None:
        for part in self.parts:
            with contextlib.suppress(Exception):
                await part.stop()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 10)
        self.parts.clear()
        self._tasks.clear()

    async def close(self) -> None:
        await self.stop()
        with contextlib.suppress(Exception):
            await self.transport.close()
        if self.kind == "rabbitmq":
            await delete_everything({self.channel: set(self.groups)})


@pytest.fixture(params=["sql", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def world(database: Database, broker_kind: str) -> AsyncIterator[World]:
    made = World(database, broker_kind)
    yield made
    await made.close()
