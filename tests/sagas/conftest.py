"""A running saga system per test: relay, orchestrator and participants on a real broker
(the SQL transport on the test database, or RabbitMQ) and a real database."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
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
    """The trip saga's whole system in this process (some parts may run elsewhere);
    ``batch_size`` > 1 runs the orchestrator and the participants in batch mode."""

    def __init__(self, database: Database, kind: str, batch_size: int = 1) -> None:
        self.database = database
        self.kind = kind
        self.batch_size = batch_size
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
            self.database,
            self.transport,
            prefix=self.prefix,
            trip=self.trip,
            batch_size=self.batch_size,
            **which,
        )
        await self.run_parts(parts)

    async def stop_participants(self) -> None:
        """Stop the participants' consumers (their groups stay: messages queue up)."""
        for part in list(self.parts):
            if getattr(part, "name", "").endswith(("-hotels", "-cars")):
                await part.stop()
                self.parts.remove(part)

    async def start_participants(self) -> None:
        await self.run_parts(
            app.participant_consumers(
                self.database, self.transport, self.prefix, batch_size=self.batch_size
            )
        )

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

    async def ended(self, count: int) -> bool:
        """Whether there are ``count`` sagas and none is running or compensating."""
        counts = await self.admin.counts()
        active = counts.get("RUNNING", 0) + counts.get("COMPENSATING", 0)
        return active == 0 and sum(counts.values()) == count

    async def published(self) -> bool:
        """Whether the relay has published everything in the outbox."""
        query = sa.select(sa.func.count()).where(outbox.c.status == "PENDING")
        async with self.database.connect() as conn:
            return await conn.scalar(query) == 0

    async def check_outcomes(self, started: dict[str, dict[str, Any]]) -> None:
        """Every saga ended as its data says it must (COMPENSATED if a step refuses,
        ``fail_at``, else COMPLETED), and the participants' ledger agrees: each step
        applied once, and if compensated the applied ones undone once, in reverse."""
        ops: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for saga_id, step, op in await app.ledger_rows(self.database):
            ops[saga_id].append((step, op))
        assert set(ops) <= set(started)
        for saga_id, data in started.items():
            state = await self.admin.get(saga_id)
            reached = data.get("fail_at", 5)
            outcome = "COMPLETED" if reached == 5 else "COMPENSATED"
            assert state.status == outcome, (saga_id, data, await self.events(saga_id))
            assert ops[saga_id] == app.expected_ops(outcome, reached), (saga_id, data)

    async def transaction_sizes(self, service: str) -> list[int]:
        """Messages per transaction of ``service``'s consumer ("orch", "hotels", "cars")."""
        return await app.transaction_sizes(self.database, f"{self.prefix}-{service}")

    async def events(self, saga_id: str) -> list[tuple[int, str, str]]:
        return [(e.step, e.phase, e.event) for e in await self.admin.history(saga_id)]

    async def stop(self) -> None:
        for part in self.parts:
            # Bounded: a part that cannot stop (after a failed test) must fail the
            # teardown, not hang the suite.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(30):
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
def batch_size() -> int:
    """1: one message per transaction. Tests parametrize it to run in batch mode too."""
    return 1


@pytest.fixture
async def world(database: Database, broker_kind: str, batch_size: int) -> AsyncIterator[World]:
    made = World(database, broker_kind, batch_size)
    yield made
    await made.close()
