"""The inbox table: which message ids a consumer has already applied."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from accord._retention import checked_batch, prune_each
from accord.db import Database
from accord.db.database import translate_errors
from accord.db.schema import inbox, inbox_holds, inbox_starts
from accord.db.types import UTCDateTime
from accord.messages import Message

__all__ = [
    "PRUNE_BATCH",
    "Inbox",
    "forget_holds",
    "forget_starts",
    "holds_of",
    "note_holds",
    "note_start",
    "prune_batch",
    "record",
    "record_many",
]


async def record_many(
    conn: AsyncConnection, consumer: str, messages: Sequence[Message]
) -> set[str]:
    """Insert the inbox rows of ``messages`` in one statement; return the ids that were
    new (the others are duplicates). Same waiting rule as :func:`record`."""
    now = datetime.now(UTC)
    types = {m.id: m.type for m in messages}
    if not types:
        return set()
    # In id order: two batches holding some of the same ids cannot deadlock.
    ids = sorted(types)
    statement: sa.Executable
    if conn.dialect.name == "postgresql":
        params: Any = {
            "consumer": consumer,
            "ids": ids,
            "types": [types[i] for i in ids],
            "now": now,
        }
        statement = _RECORD_POSTGRES
    else:
        # Executed with many parameter sets: SQLAlchemy sends one multi-row INSERT.
        params = [
            {"consumer": consumer, "message_id": i, "message_type": types[i], "processed_at": now}
            for i in ids
        ]
        statement = _RECORD_SQLITE
    return {str(row[0]) for row in (await conn.execute(statement, params)).all()}


# One SQL text whatever the batch's size, so one prepared statement (a multi-row
# VALUES is new SQL for each size, prepared again); rows go in in array order.
_RECORD_POSTGRES = sa.text(
    "INSERT INTO accord_inbox (consumer, message_id, message_type, processed_at) "
    "SELECT :consumer, u.id, u.type, :now FROM unnest(CAST(:ids AS varchar[]), "
    "CAST(:types AS varchar[])) WITH ORDINALITY AS u(id, type, n) ORDER BY u.n "
    "ON CONFLICT (consumer, message_id) DO NOTHING RETURNING message_id"
).bindparams(sa.bindparam("now", type_=UTCDateTime()))


_RECORD_SQLITE = (
    sqlite_insert(inbox)
    .on_conflict_do_nothing(index_elements=[inbox.c.consumer, inbox.c.message_id])
    .returning(inbox.c.message_id)
)


async def record(conn: AsyncConnection, consumer: str, message: Message) -> bool:
    """Insert the inbox row ``(consumer, message.id)`` in ``conn``'s transaction.

    Returns ``False`` when the row already exists: the message is a duplicate.
    ``ON CONFLICT DO NOTHING`` makes a concurrent delivery of the same id wait for
    the first transaction: if that one commits this returns ``False``; if it rolls
    back this one inserts and the handler runs once.
    """
    return message.id in await record_many(conn, consumer, [message])


async def note_holds(conn: AsyncConnection, consumer: str, message_ids: Sequence[str]) -> None:
    """Count one hold for each of ``message_ids``: ``consumer`` gives it back without
    trying it, so that redelivery is not a failed attempt (see :func:`holds_of`)."""
    if not message_ids:
        return
    now = datetime.now(UTC)
    insert = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(inbox_holds)
    statement = insert.on_conflict_do_update(
        index_elements=[inbox_holds.c.consumer, inbox_holds.c.message_id],
        set_={"holds": inbox_holds.c.holds + 1, "held_at": insert.excluded.held_at},
    )
    rows = [
        {"consumer": consumer, "message_id": m, "holds": 1, "held_at": now}
        for m in sorted(set(message_ids))
    ]
    await conn.execute(statement, rows)


async def forget_holds(conn: AsyncConnection, consumer: str, message_id: str) -> None:
    """Drop the message's holds (it was dead-lettered: a replay counts afresh)."""
    await conn.execute(
        inbox_holds.delete().where(
            inbox_holds.c.consumer == consumer, inbox_holds.c.message_id == message_id
        )
    )


async def note_start(conn: AsyncConnection, consumer: str, message_id: str) -> int:
    """Count one more start of the handler of a redelivered message; how many now."""
    now = datetime.now(UTC)
    insert = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(inbox_starts)
    statement = insert.on_conflict_do_update(
        index_elements=[inbox_starts.c.consumer, inbox_starts.c.message_id],
        set_={"starts": inbox_starts.c.starts + 1, "started_at": insert.excluded.started_at},
    ).returning(inbox_starts.c.starts)
    values = {"consumer": consumer, "message_id": message_id, "starts": 1, "started_at": now}
    return int((await conn.execute(statement, values)).scalar_one())


async def forget_starts(conn: AsyncConnection, consumer: str, message_id: str) -> None:
    """Drop the message's starts (it was applied or dead-lettered)."""
    await conn.execute(
        inbox_starts.delete().where(
            inbox_starts.c.consumer == consumer, inbox_starts.c.message_id == message_id
        )
    )


async def holds_of(conn: AsyncConnection, consumer: str, message_id: str) -> int:
    """How many of the message's redeliveries to ``consumer`` were holds, not failures."""
    query = sa.select(inbox_holds.c.holds).where(
        inbox_holds.c.consumer == consumer, inbox_holds.c.message_id == message_id
    )
    return int(await conn.scalar(query) or 0)


#: Inbox rows a prune deletes in one transaction.
PRUNE_BATCH = 5000
_PRUNED = (inbox, inbox_holds, inbox_starts)


class Inbox:
    """Read and maintain the inbox table of a database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def processed(self, consumer: str, message_id: str) -> bool:
        """Whether ``consumer`` has applied the message with this id."""
        query = sa.select(sa.literal(1)).where(
            inbox.c.consumer == consumer, inbox.c.message_id == message_id
        )
        with translate_errors("reading the inbox"):
            async with self.database.read() as conn:
                return (await conn.scalar(query)) is not None

    async def count(self, consumer: str | None = None) -> dict[str, int]:
        """How many messages each consumer (or the one named) has applied."""
        query = sa.select(inbox.c.consumer, sa.func.count()).group_by(inbox.c.consumer)
        if consumer is not None:
            query = query.where(inbox.c.consumer == consumer)
        with translate_errors("counting the inbox"):
            async with self.database.read() as conn:
                return {str(name): int(n) for name, n in (await conn.execute(query)).all()}

    async def prune(
        self,
        older_than: timedelta,
        consumer: str | None = None,
        *,
        batch: int = PRUNE_BATCH,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Delete inbox rows processed more than ``older_than`` ago (and holds and
        handler starts noted as long ago); return how many inbox rows. Each consumer's
        rows go ``batch`` at a time, a transaction each, oldest first.

        A message redelivered after its row was pruned is applied again, so keep
        ``older_than`` well above the longest redelivery window of your broker. A
        :class:`~accord.inbox.Consumer` prunes its own rows (``inbox_retention``).
        ``on_batch(pruned so far)`` is called after each batch (a progress display).
        """
        batch = checked_batch(batch)
        cutoff = datetime.now(UTC) - older_than
        with translate_errors("pruning the inbox"):
            if consumer is not None:
                consumers: Sequence[str] = [consumer]
            else:
                async with self.database.read() as conn:
                    names = sa.union(*(sa.select(t.c.consumer).distinct() for t in _PRUNED))
                    consumers = (await conn.execute(names)).scalars().all()
            return await prune_each(
                consumers,
                lambda name, n: prune_batch(self.database, name, cutoff, n),
                batch,
                on_batch,
            )


async def prune_batch(database: Database, consumer: str, cutoff: datetime, limit: int) -> int:
    """Delete up to ``limit`` of ``consumer``'s inbox rows processed before ``cutoff``,
    oldest first (a range of its (consumer, processed_at) index), in one transaction;
    on the last batch (fewer than ``limit``) its holds and starts noted before
    ``cutoff`` too. Returns how many inbox rows. Consumers of one group pruning at
    once skip each other's rows on PostgreSQL."""
    oldest = (
        sa.select(inbox.c.message_id)
        .where(inbox.c.consumer == consumer, inbox.c.processed_at < cutoff)
        .order_by(inbox.c.processed_at, inbox.c.message_id)
        .limit(limit)
    )
    async with database.transaction() as conn:
        if conn.dialect.name == "postgresql":
            oldest = oldest.with_for_update(skip_locked=True)
        # Picked first, then deleted by id: as a subquery of the DELETE, PostgreSQL
        # may scan the pick again (once per outer row) and, among rows processed at
        # the same moment, get other ones each time: more than ``limit`` went.
        ids = (await conn.execute(oldest)).scalars().all()
        count = 0
        if ids:
            statement = inbox.delete().where(
                inbox.c.consumer == consumer, inbox.c.message_id.in_(ids)
            )
            count = int((await conn.execute(statement)).rowcount)
        if count < limit:
            for table, noted in ((inbox_holds, "held_at"), (inbox_starts, "started_at")):
                await conn.execute(
                    table.delete().where(table.c.consumer == consumer, table.c[noted] < cutoff)
                )
    return count
