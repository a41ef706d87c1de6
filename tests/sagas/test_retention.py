"""Saga retention: ended instances (COMPLETED, COMPENSATED, ABORTED) older than the
retention go with their step logs; STUCK and running ones, recent ones and (for an
orchestrator) other sagas' instances stay. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema_sagas import saga_steps, sagas
from accord.errors import ConfigurationError
from accord.sagas import Orchestrator, Saga, SagaAdmin, command
from accord.sagas._admin import PRUNE_BATCH
from accord.testing import wait_for
from accord.transports.sql import SqlTransport

OLD = timedelta(days=31)
STATUSES = ("COMPLETED", "COMPENSATED", "ABORTED", "STUCK", "RUNNING", "COMPENSATING")


async def seed(
    database: Database, name: str, status: str, age: timedelta, count: int = 1
) -> list[str]:
    """``count`` instances of saga ``name`` in ``status``, last changed ``age`` ago,
    each with two step-log entries; their ids."""
    at = datetime.now(UTC) - age
    ids = [f"{name}-{status.lower()}-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    ended = at if status in ("COMPLETED", "COMPENSATED", "ABORTED") else None
    rows = [
        {
            "id": i,
            "name": name,
            "status": status,
            "phase": "action",
            "step": 0,
            "data": {},
            "created_at": at,
            "updated_at": at,
            "ended_at": ended,
        }
        for i in ids
    ]
    steps = [
        {"saga_id": i, "step": 0, "step_name": "s", "phase": "action", "event": e, "at": at}
        for i in ids
        for e in ("started", "succeeded")
    ]
    async with database.transaction() as conn:
        await conn.execute(sagas.insert(), rows)
        await conn.execute(saga_steps.insert(), steps)
    return ids


async def stored(database: Database) -> tuple[set[str], set[str]]:
    """The ids of the instances left, and of the instances with step-log entries left."""
    async with database.connect() as conn:
        left = set((await conn.execute(sa.select(sagas.c.id))).scalars().all())
        logged = set((await conn.execute(sa.select(saga_steps.c.saga_id))).scalars().all())
    return left, logged


async def test_prune_takes_only_ended_instances_past_retention(database: Database) -> None:
    await database.upgrade()
    old = {s: await seed(database, "trip", s, OLD, count=2) for s in STATUSES}
    recent = {s: await seed(database, "trip", s, timedelta(days=29)) for s in STATUSES}
    other = await seed(database, "hotel", "COMPLETED", OLD, count=3)
    admin = SagaAdmin(database)
    seen: list[int] = []
    assert await admin.prune(timedelta(days=30), name="trip", batch=4, on_batch=seen.append) == 6
    assert seen == [4, 6]  # how many so far, after each batch
    gone = {i for s in ("COMPLETED", "COMPENSATED", "ABORTED") for i in old[s]}
    everything = {i for ids in (*old.values(), *recent.values(), other) for i in ids}
    assert await stored(database) == (everything - gone, everything - gone)
    assert await admin.prune(timedelta(days=30)) == 3  # every saga's
    assert await stored(database) == (everything - gone - set(other),) * 2


async def test_a_running_orchestrator_prunes_its_own_ended_sagas(database: Database) -> None:
    """More old ended instances than one batch: the orchestrator goes on at once after
    a full batch until they are gone; a STUCK one, a recent one and another
    orchestrator's saga stay."""
    await database.upgrade()
    await seed(database, "trip", "COMPLETED", OLD, count=PRUNE_BATCH + 2)
    stuck = await seed(database, "trip", "STUCK", OLD)
    recent = await seed(database, "trip", "COMPENSATED", timedelta(days=1))
    theirs = await seed(database, "hotel", "COMPLETED", OLD)
    trip = Saga("trip").step("ask", command("trip.ask"))
    transport = SqlTransport(database.url, channel=f"c{uuid.uuid4().hex[:8]}")
    orchestrator = Orchestrator(database, transport, [trip], timer_interval=0.05)
    running = asyncio.create_task(orchestrator.run())
    try:

        async def pruned() -> bool:
            return (await stored(database))[0] == {*stuck, *recent, *theirs}

        await wait_for(pruned, timeout=30)
    finally:
        await orchestrator.stop()
        await running
        await transport.close()


async def test_no_retention_keeps_ended_sagas(database: Database) -> None:
    await database.upgrade()
    kept = await seed(database, "trip", "COMPLETED", timedelta(days=400))
    trip = Saga("trip").step("ask", command("trip.ask"))
    transport = SqlTransport(database.url, channel=f"c{uuid.uuid4().hex[:8]}")
    orchestrator = Orchestrator(database, transport, [trip], timer_interval=0.05, retention=None)
    running = asyncio.create_task(orchestrator.run())
    try:
        await asyncio.sleep(0.5)  # ten rounds of its timer, where pruning happens
        assert (await stored(database))[0] == set(kept)
    finally:
        await orchestrator.stop()
        await running
        await transport.close()


async def test_a_prune_refuses_a_batch_below_one(database: Database) -> None:
    with pytest.raises(ConfigurationError, match="batch must be at least 1, got 0"):
        await SagaAdmin(database).prune(timedelta(days=30), batch=0)
