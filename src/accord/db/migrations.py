"""Versioned, idempotent schema migrations for Accord's tables."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.database import Database
from accord.db.schema import metadata, queue, schema_version
from accord.errors import ConfigurationError

__all__ = ["MIGRATIONS", "current_version", "upgrade"]

Migration = Callable[[AsyncConnection], Awaitable[None]]


async def _create_missing(conn: AsyncConnection) -> None:
    await conn.run_sync(lambda sync: metadata.create_all(sync, checkfirst=True))


async def _queue_autoincrement(conn: AsyncConnection) -> None:
    """SQLite: rebuild ``accord_queue`` with AUTOINCREMENT, so that the seq of a
    deleted message is never given to a newer one (PostgreSQL's sequences never
    reuse a value)."""
    if conn.dialect.name != "sqlite":
        return
    ddl = await conn.scalar(
        sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'accord_queue'")
    )
    if ddl is None or "AUTOINCREMENT" in ddl.upper():
        return
    old = "accord_queue_before_v3"
    columns = ", ".join(c.name for c in queue.columns)
    await conn.execute(sa.text("DROP INDEX IF EXISTS ix_accord_queue_channel"))
    await conn.execute(sa.text(f"ALTER TABLE accord_queue RENAME TO {old}"))
    await conn.run_sync(lambda sync: queue.create(sync))
    await conn.execute(sa.text(f"INSERT INTO accord_queue ({columns}) SELECT {columns} FROM {old}"))
    await conn.execute(sa.text(f"DROP TABLE {old}"))


async def _create_indexes(conn: AsyncConnection, table: sa.Table, *names: str) -> None:
    """Create the indexes ``names`` of ``table`` as ``metadata`` defines them, unless
    they exist (a database made at a later version has them from step 1)."""
    indexes = [index for index in table.indexes if index.name in names]

    def create(sync: sa.Connection) -> None:
        for index in indexes:
            index.create(sync, checkfirst=True)

    await conn.run_sync(create)


async def _dead_letter_indexes(conn: AsyncConnection) -> None:
    """Index dead letters by message (found again when dead-lettered again) and by
    consumer, status and id (replays taken in order)."""
    from accord.db.schema import dead_letters

    await _create_indexes(
        conn, dead_letters, "ix_accord_dead_letters_message", "ix_accord_dead_letters_replay"
    )


async def _deadline_saga_names(conn: AsyncConnection) -> None:
    """Name each deadline's saga, and index deadlines by (saga name, due time): a
    timer then reads only its own sagas' due rows."""
    from accord.db.schema_sagas import deadlines

    def columns(sync: sa.Connection) -> set[str]:
        return {c["name"] for c in sa.inspect(sync).get_columns(deadlines.name)}

    if "saga_name" not in await conn.run_sync(columns):
        await conn.execute(
            sa.text("ALTER TABLE accord_deadlines ADD COLUMN saga_name VARCHAR(200)")
        )
    await conn.execute(
        sa.text(
            "UPDATE accord_deadlines SET saga_name = "
            "(SELECT name FROM accord_sagas WHERE accord_sagas.id = accord_deadlines.saga_id) "
            "WHERE saga_name IS NULL"
        )
    )
    await _create_indexes(conn, deadlines, "ix_accord_deadlines_name_due")
    await conn.execute(sa.text("DROP INDEX IF EXISTS ix_accord_deadlines_due"))


async def _flow_heads(conn: AsyncConnection) -> None:
    """Add ``accord_flow_heads`` and fill it in from the flows recorded so far."""
    await _create_missing(conn)
    await conn.execute(
        sa.text(
            """
INSERT INTO accord_flow_heads (correlation_id, messages, last_id, last_type, last_at, ended,
                               orchestrated)
SELECT g.correlation_id, g.messages, g.last_id, f.type, g.last_at, g.ended = 1,
       g.orchestrated = 1 OR EXISTS (SELECT 1 FROM accord_sagas AS s
                                     WHERE s.id = g.correlation_id)
FROM (SELECT correlation_id, count(*) AS messages, max(id) AS last_id,
             max(recorded_at) AS last_at,
             max(CASE WHEN outcome IN ('completed', 'compensated') THEN 1 ELSE 0 END) AS ended,
             max(CASE WHEN outcome IN ('command', 'ok') THEN 1 ELSE 0 END) AS orchestrated
      FROM accord_flows GROUP BY correlation_id) AS g
JOIN accord_flows AS f ON f.id = g.last_id
WHERE NOT EXISTS (SELECT 1 FROM accord_flow_heads AS h
                  WHERE h.correlation_id = g.correlation_id)
"""
        )
    )


async def _participation_index(conn: AsyncConnection) -> None:
    """Version 8 indexed participants' records by (participant, time); version 10
    drops that index, so an older database skips building it only to drop it."""


async def _drop_participation_index(conn: AsyncConnection) -> None:
    """Drop version 8's (participant, time) index of participants' records: a
    participant's lookups by saga took it, with no statistics, instead of the key.
    (Version 10 as first released put a (time, participant) index in its place;
    version 11 replaces that one too.)"""
    await conn.execute(sa.text("DROP INDEX IF EXISTS ix_accord_saga_participations_at"))


async def _participation_prune_index(conn: AsyncConnection) -> None:
    """Index participants' records, not their pruning marks, by (participant, time):
    pruning one participant reads a range of its own records, and lookups by saga,
    which do not say they skip the marks, cannot take the index."""
    from accord.db.schema_sagas import participations

    await conn.execute(sa.text("DROP INDEX IF EXISTS ix_accord_saga_participations_time"))
    await _create_indexes(conn, participations, "ix_accord_saga_participations_prune")


async def _scheduled_index(conn: AsyncConnection) -> None:
    """Index outbox rows added for later by due time: relays release the due ones."""
    from accord.db.schema import outbox

    await _create_indexes(conn, outbox, "ix_accord_outbox_scheduled")


#: (version, what it does, the step). Append; never edit a released step.
MIGRATIONS: list[tuple[int, str, Migration]] = [
    (1, "create every Accord table", _create_missing),
    (2, "add accord_inbox_holds (redeliveries that were not failures)", _create_missing),
    (3, "SQLite: accord_queue never reuses a message's seq", _queue_autoincrement),
    (4, "add accord_inbox_starts (handler starts of redelivered messages)", _create_missing),
    (5, "index accord_dead_letters by message and for replays", _dead_letter_indexes),
    (6, "name each deadline's saga; index deadlines by (saga, due time)", _deadline_saga_names),
    (7, "add accord_flow_heads (one row per tracked flow)", _flow_heads),
    (8, "(replaced by 10) index participants' records by participant", _participation_index),
    (9, "index accord_outbox rows scheduled for later by due time", _scheduled_index),
    (10, "drop accord_saga_participations' (participant, time) index", _drop_participation_index),
    (11, "index participants' records, not pruning marks, by time", _participation_prune_index),
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
        latest = MIGRATIONS[-1][0]
        if version > latest:
            raise ConfigurationError(
                f"this database's Accord schema is at version {version}, newer than this "
                f"Accord knows ({latest}): a newer Accord migrated it; upgrade Accord"
            )
        for number, _what, step in MIGRATIONS:
            if number <= version:
                continue
            await step(conn)
            await conn.execute(
                schema_version.insert().values(version=number, applied_at=datetime.now(UTC))
            )
            version = number
    return version
