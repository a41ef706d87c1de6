"""The event store on SQLite (and any SQLAlchemy dialect with a single writer at a time).

SQLite runs one write transaction at a time (Accord opens them with ``BEGIN
IMMEDIATE``), so transactions commit in the order they took their positions:
a plain increasing ``position`` is already gap-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.database import translate_errors
from accord.db.schema_events import events
from accord.eventstore._store import EventStore, _Row
from accord.eventstore._types import AppendResult, ExpectedVersion, RecordedEvent

__all__ = ["SqliteEventStore"]

_COLUMNS = [
    events.c.position,
    events.c.stream_id,
    events.c.version,
    events.c.id,
    events.c.type,
    events.c.schema_version,
    events.c.data,
    events.c["metadata"],
    events.c.recorded_at,
]

#: Above every stream version.
_NO_VERSION = 2**31 - 1


class SqliteEventStore(EventStore):
    """The event store on SQLite: dense positions 1, 2, 3... in commit order."""

    poll_interval = 0.1

    async def _append(
        self,
        conn: AsyncConnection,
        stream_id: str,
        rows: Sequence[_Row],
        expected: ExpectedVersion,
    ) -> AppendResult:
        with translate_errors(f"appending to stream {stream_id!r}"):
            # The transaction holds SQLite's write lock (BEGIN IMMEDIATE), so
            # nothing can change between this read and the insert.
            current = await conn.scalar(
                sa.select(sa.func.coalesce(sa.func.max(events.c.version), 0)).where(
                    events.c.stream_id == stream_id
                )
            )
            actual = int(current or 0)
            self._check(stream_id, expected, actual)
            top = await conn.scalar(sa.select(sa.func.coalesce(sa.func.max(events.c.position), 0)))
            top = int(top or 0)
            values = [
                {
                    "position": top + i + 1,
                    "stream_id": stream_id,
                    "version": actual + i + 1,
                    "id": row.id,
                    "type": row.type,
                    "schema_version": row.schema_version,
                    "data": row.data,
                    "metadata": row.metadata,
                    "recorded_at": row.recorded_at,
                }
                for i, row in enumerate(rows)
            ]
            await conn.execute(events.insert(), values)
        return AppendResult(
            stream_id, actual + len(rows), tuple(top + i + 1 for i in range(len(rows)))
        )

    async def _fetch(self, query: Any, conn: AsyncConnection | None) -> Sequence[Any]:
        with translate_errors("reading events"):
            if conn is not None:
                return (await conn.execute(query)).all()
            async with self.database.read() as own:
                return (await own.execute(query)).all()

    async def _read_stream(
        self,
        stream_id: str,
        from_version: int,
        to_version: int | None,
        backwards: bool,
        as_of: datetime | None,
        limit: int | None,
        conn: AsyncConnection | None,
    ) -> Sequence[Any]:
        query = sa.select(*_COLUMNS).where(
            events.c.stream_id == stream_id, events.c.version >= from_version
        )
        if to_version is not None:
            query = query.where(events.c.version <= to_version)
        if as_of is not None:
            # A prefix of versions: up to the first event recorded after ``as_of``
            # (one appended later with an earlier NewEvent.time must not leave a gap).
            later = (
                sa.select(sa.func.min(events.c.version))
                .where(events.c.stream_id == stream_id, events.c.recorded_at > as_of)
                .scalar_subquery()
            )
            query = query.where(events.c.version < sa.func.coalesce(later, _NO_VERSION))
        query = query.order_by(events.c.version.desc() if backwards else events.c.version)
        if limit is not None:
            query = query.limit(limit)
        return await self._fetch(query, conn)

    async def _stream_version(self, stream_id: str, conn: AsyncConnection | None) -> int:
        query = sa.select(sa.func.coalesce(sa.func.max(events.c.version), 0)).where(
            events.c.stream_id == stream_id
        )
        rows = await self._fetch(query, conn)
        return int(rows[0][0])

    async def _read_all(
        self, after: int, limit: int, types: list[str] | None, conn: AsyncConnection | None
    ) -> tuple[list[RecordedEvent], int]:
        query = sa.select(*_COLUMNS).where(events.c.position > after)
        if types:
            query = query.where(events.c.type.in_(types))
        query = query.order_by(events.c.position).limit(limit)
        rows = await self._fetch(query, conn)
        # Everything committed is visible: the bound is "no limit".
        return [self._recorded(r) for r in rows], 2**63 - 1

    async def _head(self, conn: AsyncConnection | None) -> int:
        rows = await self._fetch(
            sa.select(sa.func.coalesce(sa.func.max(events.c.position), 0)), conn
        )
        return int(rows[0][0])

    async def _count(
        self, after: int, upto: int | None, types: list[str] | None, conn: AsyncConnection | None
    ) -> int:
        query = sa.select(sa.func.count()).select_from(events).where(events.c.position > after)
        if upto is not None:
            query = query.where(events.c.position <= upto)
        if types:
            query = query.where(events.c.type.in_(types))
        rows = await self._fetch(query, conn)
        return int(rows[0][0])
