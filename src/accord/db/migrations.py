"""Versioned, idempotent schema migrations for Accord's tables."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.database import Database
from accord.db.schema import metadata, schema_version

__all__ = ["MIGRATIONS", "current_version", "upgrade"]

Migration = Callable[[AsyncConnection], Awaitable[None]]


async def _create_missing(conn: AsyncConnection) -> None:
    await conn.run_sync(lambda sync: metadata.create_all(sync, checkfirst=True))


#: (version, what it does, the step). Append; never edit a released step.
MIGRATIONS: list[tuple[int, str, Migration]] = [
    (1, "create every Accord table", _create_missing),
    (2, "add accord_inbox_holds (redeliveries that were not failures)", _create_missing),
]

_LOCK_ID = 0x4143_4F52  # "ACOR": serialises concurrent upgrades on PostgreSQL


async def current_version(conn: AsyncConnection) -> int:
    """The schema version recorded in the database, 0 if none."""
    exists = await conn.run_sync(lambda sync: sa.inspect(sync).has_table(schema_version.name))
    if not exists:
        return 0
    value = await conn.scalar(sa.select(sa.func.max(schema_version.c.version)))
    return int(value or 0)


async def upgrade(db: Database) -> int:
    """Apply every migration the database lacks, each in its own transaction."""
    async with db.transaction() as conn:
        if db.is_postgres:
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        await conn.run_sync(lambda sync: schema_version.create(sync, checkfirst=True))
        version = await current_version(conn)
        for number, _what, step in MIGRATIONS:
            if number <= version:
                continue
            await step(conn)
            await conn.execute(
                schema_version.insert().values(version=number, applied_at=datetime.now(UTC))
            )
            version = number
    return version
