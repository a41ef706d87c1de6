"""The event store on PostgreSQL: gap-safe positions from transaction ids, no table lock.

``position = pg_current_xact_id() * 2**20 + index`` and readers see only
positions below ``pg_snapshot_xmin(pg_current_snapshot()) * 2**20`` (see the
package docs for why that is gap-safe). An append is one statement - version
check, insert, position assignment and NOTIFY - so outside a caller's
transaction it runs in a single round trip on the driver connection.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord.db.database import _hint, translate_errors
from accord.errors import AccordError, ConfigurationError, DatabaseError
from accord.eventstore._store import NOTIFY_CHANNEL, EventStore, _Row
from accord.eventstore._types import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    ExpectedVersion,
    RecordedEvent,
)

__all__ = ["MAX_EVENTS_PER_TRANSACTION", "PostgresEventStore"]

#: Positions of one transaction are ``xid * 2**20 + 0 .. 2**20 - 1``.
MAX_EVENTS_PER_TRANSACTION = 1 << 20
_XID = "pg_current_xact_id()::text::bigint * 1048576"
_BOUND = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint * 1048576"
_CONSTRAINT = "uq_accord_events_stream_version"
_COLUMNS = "position, stream_id, version, id, type, schema_version, data, metadata, recorded_at"

_APPEND = f"""
WITH cur AS (
    SELECT coalesce(max(version), 0) AS v FROM accord_events WHERE stream_id = $1
), top AS (
    SELECT tx.base, coalesce(
        (SELECT max(position) + 1 FROM accord_events
         WHERE position >= tx.base AND position < tx.base + 1048576), tx.base) AS first
    FROM (SELECT {_XID} AS base) tx
), ins AS (
    INSERT INTO accord_events ({_COLUMNS})
    SELECT top.first + n.ord - 1, $1, cur.v + n.ord, n.id, n.type, n.sv,
           n.data::jsonb, n.meta::jsonb, n.t
    FROM cur, top, unnest($2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[],
                          $7::timestamptz[]) WITH ORDINALITY AS n(id, type, sv, data, meta, t, ord)
    WHERE {{check}} AND top.first + $8 <= top.base + 1048576
    RETURNING position
)
SELECT cur.v, top.first, top.base,
       (SELECT count(*) FROM ins),
       (SELECT pg_notify('{NOTIFY_CHANNEL}', max(position)::text) FROM ins HAVING count(*) > 0)
FROM cur, top
"""
_CHECKS = {
    ANY: "true",
    NO_STREAM: "cur.v = 0",
    STREAM_EXISTS: "cur.v > 0",
}
_APPEND_SQL = {k: _APPEND.format(check=v) for k, v in _CHECKS.items()}
_APPEND_EXACT = _APPEND.format(check="cur.v = $9")
# Outside a caller's transaction the store notifies after commit, coalesced
# (see PostgresEventStore._notify_later): NOTIFY takes a cluster-wide lock held
# across the commit's WAL flush, which would serialise concurrent writers.
_NOTIFY_IN_TX = (
    f"(SELECT pg_notify('{NOTIFY_CHANNEL}', max(position)::text) FROM ins HAVING count(*) > 0)"
)
_APPEND_SQL_QUIET = {k: v.replace(_NOTIFY_IN_TX, "NULL") for k, v in _APPEND_SQL.items()}
_APPEND_EXACT_QUIET = _APPEND_EXACT.replace(_NOTIFY_IN_TX, "NULL")

_READ_ALL = f"""
WITH b AS (SELECT {_BOUND} AS bound)
SELECT b.bound, e.* FROM b LEFT JOIN LATERAL (
    SELECT {_COLUMNS} FROM accord_events
    WHERE position > $1 AND position < b.bound {{types}}
    ORDER BY position LIMIT $2
) e ON true ORDER BY e.position
"""
_READ_ALL_SQL = _READ_ALL.format(types="")
_HEAD = f"SELECT coalesce(max(position), 0) FROM accord_events WHERE position < {_BOUND}"


def _type_list(types: Sequence[str]) -> str:
    """``types`` as SQL literals. Reads by type name them in the statement, not as a
    parameter: a prepared statement's generic plan then still knows how rare each
    type is (with a parameter it walked the position order past every other type's
    events: 120-140 ms a poll at a million events for a projection of rare types)."""
    return ", ".join(
        "E'" + t.replace("\\", "\\\\").replace("'", "\\'") + "'" for t in sorted(set(types))
    )


def _read_all_types(types: Sequence[str]) -> str:
    return _READ_ALL.format(types=f"AND type IN ({_type_list(types)})")


def _count_sql(upto: bool, types: Sequence[str] | None) -> str:
    """One statement per shape ($1 = after, $2 = upto): an ``$n IS NULL OR ...``
    condition keeps a generic plan off the indexes."""
    sql = f"SELECT count(*) FROM accord_events WHERE position > $1 AND position < {_BOUND}"
    if upto:
        sql += " AND position <= $2"
    if types:
        sql += f" AND type IN ({_type_list(types)})"
    return sql


_VERSION = "SELECT coalesce(max(version), 0) FROM accord_events WHERE stream_id = $1"


def _is_version_conflict(exc: BaseException) -> bool:
    text = str(exc)
    return _CONSTRAINT in text or (
        isinstance(exc, asyncpg.UniqueViolationError)
        and getattr(exc, "constraint_name", None) == _CONSTRAINT
    )


class PostgresEventStore(EventStore):
    """The event store on PostgreSQL: concurrent writers, gap-safe readers.

    Appends and reads made outside a caller's transaction run as single
    statements on plain asyncpg connections that the store keeps between calls
    (at most ``hot_connections`` idle ones; a SQLAlchemy pool checkout costs
    more than the append itself). :meth:`close` closes them.
    """

    #: Pool connections the store keeps for its own statements between calls.
    hot_connections = 8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._idle: list[Any] = []
        self._notify_max = 0
        self._notified = 0
        self._notifier: asyncio.Task[None] | None = None

    async def _driver_call(self, fn: Callable[[Any], Any], what: str) -> Any:
        """Run ``fn(asyncpg_connection)`` outside any transaction (each statement
        commits on its own), on one of the store's own connections."""
        conn: Any = None
        try:
            conn = self._idle.pop() if self._idle else await self.database.connect_driver()
            result = await fn(conn)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            if conn is not None and not isinstance(exc, asyncpg.PostgresError):
                conn.terminate()
                conn = None
            raise DatabaseError(
                f"{what} failed{_hint(exc)}: {exc.__class__.__name__}: {exc}"
            ) from exc
        except AccordError:
            # Our own verdict on a finished statement (a version conflict...): the
            # connection is clean; keep it - conflicts come in bursts under contention.
            raise
        except BaseException:
            if conn is not None:
                conn.terminate()  # it may be mid-statement (cancelled): never reuse it
                conn = None
            raise
        finally:
            if conn is not None:
                if len(self._idle) < self.hot_connections:
                    self._idle.append(conn)
                else:
                    await conn.close()
        return result

    def _notify_later(self, position: int) -> None:
        """NOTIFY subscribers of ``position`` after its commit, coalescing bursts into one."""
        self._notify_max = max(self._notify_max, position)
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(self._send_notifications())

    async def _send_notifications(self) -> None:
        while self._notify_max > self._notified:
            position = self._notify_max
            try:
                await self._driver_call(
                    functools.partial(_notify, payload=str(position)), "notifying subscribers"
                )
            except DatabaseError:
                return  # subscribers also poll; a lost wake-up only delays them
            self._notified = position

    async def close(self) -> None:
        """Wait for pending notifications and give the store's connections back to the pool."""
        if self._notifier is not None:
            await asyncio.gather(self._notifier, return_exceptions=True)
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await conn.close()
            except Exception:  # closing anyway
                conn.terminate()

    async def _query(
        self, sql: str, args: Sequence[Any], conn: AsyncConnection | None, what: str
    ) -> Sequence[Any]:
        if conn is not None:
            with translate_errors(what):
                return (await conn.exec_driver_sql(sql, tuple(args))).all()
        result: Sequence[Any] = await self._driver_call(lambda d: d.fetch(sql, *args), what)
        return result

    @staticmethod
    def _append_args(
        stream_id: str, rows: Sequence[_Row], expected: ExpectedVersion, quiet: bool = False
    ) -> tuple[str, list[Any]]:
        args: list[Any] = [
            stream_id,
            [r.id for r in rows],
            [r.type for r in rows],
            [r.schema_version for r in rows],
            [r.data_json for r in rows],
            [r.metadata_json for r in rows],
            [r.recorded_at for r in rows],
            len(rows),
        ]
        if isinstance(expected, int):
            args.append(expected)
            return (_APPEND_EXACT_QUIET if quiet else _APPEND_EXACT), args
        return (_APPEND_SQL_QUIET if quiet else _APPEND_SQL)[expected], args

    def _result(
        self, stream_id: str, rows: Sequence[_Row], expected: ExpectedVersion, row: Any
    ) -> AppendResult | None:
        actual, first, base, inserted, _ = row
        if inserted == len(rows):
            return AppendResult(
                stream_id, actual + len(rows), tuple(range(first, first + len(rows)))
            )
        self._check(stream_id, expected, actual)
        raise ConfigurationError(
            f"one transaction may append at most {MAX_EVENTS_PER_TRANSACTION} events "
            f"(this one already has {first - base}): split the import into several transactions"
        )

    async def _append(
        self,
        conn: AsyncConnection,
        stream_id: str,
        rows: Sequence[_Row],
        expected: ExpectedVersion,
    ) -> AppendResult:
        sql, args = self._append_args(stream_id, rows, expected)
        retry = expected is ANY or expected is STREAM_EXISTS
        for attempt in range(50):
            try:
                if retry:
                    # A racing writer of the same stream makes the insert fail;
                    # the savepoint keeps the caller's transaction usable.
                    async with conn.begin_nested():
                        result = (await conn.exec_driver_sql(sql, tuple(args))).one()
                else:
                    result = (await conn.exec_driver_sql(sql, tuple(args))).one()
            except sa.exc.IntegrityError as exc:
                if not _is_version_conflict(exc):
                    raise DatabaseError(f"appending to {stream_id!r} failed: {exc}") from exc
                if retry:
                    await asyncio.sleep(0.001 * attempt)
                    continue
                raise self._conflict(
                    stream_id, expected, await self._committed_version(stream_id)
                ) from None
            except sa.exc.SQLAlchemyError as exc:
                raise DatabaseError(f"appending to {stream_id!r} failed: {exc}") from exc
            appended = self._result(stream_id, rows, expected, result)
            assert appended is not None
            return appended
        raise DatabaseError(f"appending to {stream_id!r} kept colliding with other writers")

    async def _append_own(
        self, stream_id: str, rows: Sequence[_Row], expected: ExpectedVersion
    ) -> AppendResult:
        sql, args = self._append_args(stream_id, rows, expected, quiet=True)

        async def go(driver: Any) -> AppendResult:
            for attempt in range(50):
                try:
                    # One statement outside a transaction block: it is its own
                    # transaction, committed before fetchrow returns.
                    row = await driver.fetchrow(sql, *args)
                except asyncpg.UniqueViolationError as exc:
                    if not _is_version_conflict(exc):
                        raise
                    if expected is ANY or expected is STREAM_EXISTS:
                        await asyncio.sleep(0.001 * attempt)
                        continue
                    actual = await driver.fetchval(_VERSION, stream_id)
                    raise self._conflict(stream_id, expected, int(actual)) from None
                appended = self._result(stream_id, rows, expected, row)
                assert appended is not None
                return appended
            raise DatabaseError(f"appending to {stream_id!r} kept colliding with other writers")

        result: AppendResult = await self._driver_call(go, f"appending to stream {stream_id!r}")
        self._notify_later(result.positions[-1])
        return result

    async def _committed_version(self, stream_id: str) -> int:
        rows = await self._query(_VERSION, [stream_id], None, "reading a stream version")
        return int(rows[0][0])

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
        sql = (
            f"SELECT {_COLUMNS} FROM accord_events WHERE stream_id = $1 AND version >= $2"
            " AND ($3::int IS NULL OR version <= $3)"
            # A prefix of versions: up to the first event recorded after ``as_of``
            # (one appended later with an earlier NewEvent.time must not leave a gap).
            " AND ($4::timestamptz IS NULL OR version < coalesce((SELECT min(version)"
            " FROM accord_events WHERE stream_id = $1 AND recorded_at > $4), 2147483647))"
            f" ORDER BY version {'DESC' if backwards else 'ASC'} LIMIT $5"
        )
        args = [stream_id, from_version, to_version, as_of, limit]
        return await self._query(sql, args, conn, f"reading stream {stream_id!r}")

    async def _stream_version(self, stream_id: str, conn: AsyncConnection | None) -> int:
        rows = await self._query(_VERSION, [stream_id], conn, "reading a stream version")
        return int(rows[0][0])

    async def _read_all(
        self, after: int, limit: int, types: list[str] | None, conn: AsyncConnection | None
    ) -> tuple[list[RecordedEvent], int]:
        sql = _read_all_types(types) if types else _READ_ALL_SQL
        rows = await self._query(sql, [after, limit], conn, "reading all events")
        bound = int(rows[0][0])
        events = [self._recorded(tuple(r)[1:]) for r in rows if r[1] is not None]
        return events, bound

    async def _head(self, conn: AsyncConnection | None) -> int:
        rows = await self._query(_HEAD, [], conn, "reading the head position")
        return int(rows[0][0])

    async def _count(
        self, after: int, upto: int | None, types: list[str] | None, conn: AsyncConnection | None
    ) -> int:
        sql = _count_sql(upto is not None, types)
        args = [after] if upto is None else [after, upto]
        rows = await self._query(sql, args, conn, "counting events")
        return int(rows[0][0])

    async def _listen(self, callback: Any) -> Any:
        return await self.database.listen(NOTIFY_CHANNEL, callback)


async def _notify(driver: Any, payload: str) -> None:
    await driver.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload)
