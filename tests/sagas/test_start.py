"""Starting a saga: on PostgreSQL one statement that commits on its own when the
saga's first step is a command; in a transaction otherwise, or in the caller's."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
from accord.db.schema_sagas import sagas
from accord.sagas import Orchestrator, Saga, StepContext, command
from accord.transports.sql import SqlTransport

_LOCAL = sa.text("CREATE TABLE IF NOT EXISTS start_effects (saga_id text)")


def _orchestrator(database: Database, saga: Saga) -> Orchestrator:
    return Orchestrator(database, SqlTransport(database.url, channel="start"), [saga])


def _remote_first() -> Saga:
    return Saga("remote-first").step("book", command("hotels.book"))


async def _record(ctx: StepContext) -> None:
    await ctx.conn.execute(
        sa.text("INSERT INTO start_effects (saga_id) VALUES (:s)"), {"s": ctx.saga_id}
    )


def _local_first() -> Saga:
    return Saga("local-first").step("note", _record).step("book", command("hotels.book"))


async def _stored(database: Database, saga_id: str) -> tuple[int, int]:
    """(instances, outbox rows) of ``saga_id``, read on another connection."""
    async with database.connect() as conn:
        instances = await conn.scalar(
            sa.select(sa.func.count()).select_from(sagas).where(sagas.c.id == saga_id)
        )
        commands = await conn.scalar(sa.select(sa.func.count()).select_from(outbox))
    return int(instances or 0), int(commands or 0)


@pytest.mark.postgres
async def test_a_saga_whose_first_step_is_a_command_starts_in_one_statement(
    pg_url: str,
) -> None:
    """No BEGIN and no COMMIT: the instance, its log, its deadline and its first
    command go in one statement that is a transaction of its own (one round trip)."""
    database = Database(pg_url)
    sent: list[str] = []

    @sa.event.listens_for(database.engine.sync_engine, "connect")
    def log_queries(_dbapi: Any, record: Any) -> None:
        record.driver_connection.add_query_logger(lambda q: sent.append(q.query))

    await database.upgrade()
    orchestrator = _orchestrator(database, _remote_first())
    try:
        await orchestrator.start("remote-first", {}, saga_id="warm-up")  # pool, clock
        sent.clear()
        saga_id = await orchestrator.start("remote-first", {"n": 1}, saga_id="s-1")
        assert [q.split()[0].upper() for q in sent] == ["WITH"], sent
        assert "INSERT INTO accord_sagas" in sent[0]
        assert await _stored(database, saga_id) == (1, 2)
        # Idempotent per id: the same statement writes nothing (then a read makes sure
        # the instance there is one of this saga).
        sent.clear()
        assert await orchestrator.start("remote-first", {"n": 2}, saga_id="s-1") == "s-1"
        assert sent[0].split()[0].upper() == "WITH", sent
        assert await _stored(database, saga_id) == (1, 2)
    finally:
        await database.dispose()


async def test_a_saga_whose_first_step_is_local_starts_in_one_transaction(
    database: Database,
) -> None:
    """Its local step runs before the instance is stored: both commit together."""
    async with database.transaction() as conn:
        await conn.execute(_LOCAL)
    orchestrator = _orchestrator(database, _local_first())
    saga_id = await orchestrator.start("local-first", {})
    assert await _stored(database, saga_id) == (1, 1)
    async with database.connect() as conn:
        effects = (await conn.execute(sa.text("SELECT saga_id FROM start_effects"))).all()
    assert effects == [(saga_id,)]


async def test_a_start_on_a_callers_connection_that_sent_nothing_yet_is_in_its_transaction(
    database: Database,
) -> None:
    """A caller's connection in no transaction yet begins one with the start's first
    statement: the start is undone with it."""
    orchestrator = _orchestrator(database, _remote_first())
    async with database.connect() as conn:
        assert not conn.in_transaction()
        saga_id = await orchestrator.start("remote-first", {}, conn=conn)
        assert conn.in_transaction()
        await conn.rollback()
    assert await _stored(database, saga_id) == (0, 0)
    async with database.connect() as conn:
        saga_id = await orchestrator.start("remote-first", {}, conn=conn)
        await conn.commit()
    assert await _stored(database, saga_id) == (1, 1)
