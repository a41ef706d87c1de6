"""Adding messages to the outbox inside the caller's own transaction."""

from __future__ import annotations

import contextlib
import functools
import json
import uuid
import weakref
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from accord.db.database import Database, driver_in_transaction, translate_errors
from accord.db.schema import outbox
from accord.errors import ConfigurationError
from accord.messages import Message, decode, headers_of

__all__ = [
    "NOTIFY_CHANNEL",
    "add",
    "driver_row",
    "message_from_row",
    "row_from_message",
    "transaction",
]

#: The PostgreSQL channel a commit that added outbox rows notifies; relays LISTEN on it.
NOTIFY_CHANNEL = "accord_outbox"


def row_from_message(message: Message, now: datetime) -> dict[str, Any]:
    """The outbox row for a message (headers keep every CloudEvents attribute)."""
    try:
        row_id = uuid.UUID(message.id)
    except ValueError:
        raise ConfigurationError(
            f"outbox message id {message.id!r} is not a UUID; leave Message.id to its "
            "default or use uuid.uuid5() for a deterministic id"
        ) from None
    headers = headers_of(message)
    return {
        "id": row_id,
        "event_type": message.type,
        "key": message.key,
        "payload": message.data,
        "headers": headers,
        "status": "PENDING",
        "retry_count": 0,
        "available_at": now,
        "created_at": now,
    }


def message_from_row(headers: dict[str, str], payload: Any) -> Message:
    """Rebuild the message an outbox row was made from."""
    return decode(headers, json.dumps(payload, separators=(",", ":"), default=str).encode())


# One prepared statement, one round trip: the row and the wake-up of the relays.
# The notification is delivered at commit, and only if the transaction commits;
# identical notifications in one transaction are folded into one.
_PG_ADD = (
    "WITH added AS (INSERT INTO accord_outbox (id, event_type, key, payload, headers, status, "
    "retry_count, available_at, created_at) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, "
    "'PENDING', 0, $6, $6) ON CONFLICT (id) DO NOTHING RETURNING 1) "
    f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"
)


async def add(conn: AsyncConnection | AsyncSession, *messages: Message) -> None:
    """Write ``messages`` to the outbox in the transaction ``conn`` is in.

    Nothing is published unless that transaction commits; once it commits, the
    relay publishes each message at least once, with its id unchanged.
    Messages with the same ``key`` are published in the order they were added.
    A message whose id is in the outbox already is not added again: give a retried
    operation a deterministic id (``uuid.uuid5``) and it stays one message.
    """
    if not messages:
        return
    connection = await conn.connection() if isinstance(conn, AsyncSession) else conn
    now = datetime.now(UTC)
    rows = [row_from_message(m, now) for m in messages]
    deferred = _DEFERRED.get(connection.sync_connection) if connection.sync_connection else None
    if deferred is not None:
        deferred.extend(rows)  # written with the COMMIT of outbox.transaction()
        return
    with translate_errors("adding to the outbox"):
        if connection.dialect.name == "postgresql" and await _add_on_driver(connection, rows):
            return
        await connection.execute(_insert_ignoring_duplicates(connection.dialect.name), rows)
        if connection.dialect.name == "postgresql":
            await connection.execute(sa.text(f"NOTIFY {NOTIFY_CHANNEL}"))


def driver_row(row: dict[str, Any]) -> tuple[uuid.UUID, str, str | None, str, str]:
    """``(id, event_type, key, payload JSON, headers JSON)`` of an outbox row, as the
    statements sent straight to asyncpg take them."""
    return (
        row["id"],
        row["event_type"],
        row["key"],
        _to_json(row["payload"]),
        _to_json(row["headers"]),
    )


# json.dumps() with arguments builds a new encoder on every call.
_to_json = json.JSONEncoder(separators=(",", ":"), default=str).encode


async def _add_on_driver(connection: AsyncConnection, rows: list[dict[str, Any]]) -> bool:
    """The hot path: asyncpg underneath SQLAlchemy's own transaction. Returns False
    (nothing done) when the driver cannot be had in that transaction, so the
    caller's statements and ours can never end up in different transactions."""
    driver = await driver_in_transaction(connection)
    if driver is None:
        return False
    # add() translates asyncpg's own errors (translate_errors) like SQLAlchemy's.
    await driver.executemany(_PG_ADD, [(*driver_row(r), r["created_at"]) for r in rows])
    return True


@functools.cache
def _insert_ignoring_duplicates(dialect: str) -> Any:
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    return insert(outbox).on_conflict_do_nothing(index_elements=[outbox.c.id])


# -- outbox.transaction(): the rows travel with the COMMIT --------------------------

# The rows add() was given inside an open outbox.transaction(), by its connection.
_DEFERRED: weakref.WeakKeyDictionary[Connection, list[dict[str, Any]]] = weakref.WeakKeyDictionary()
# Per Database, its engine with the driver in autocommit: BEGIN and COMMIT are ours.
_AUTOCOMMIT: weakref.WeakKeyDictionary[Database, AsyncEngine] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def transaction(database: Database) -> AsyncIterator[AsyncConnection]:
    """A transaction, like ``database.transaction()``, whose outbox rows are sent
    to PostgreSQL together with its ``COMMIT``: one round trip fewer than
    :func:`add` on an ordinary transaction.

    Use the connection for your own statements (or bind an ``AsyncSession`` to
    it) and call :func:`add` as usual; the messages are held in memory and
    written — rows, the relays' wake-up and ``COMMIT`` in one message to the
    server — when the block exits. The guarantee is the same: the rows commit
    with your statements or not at all. What differs: your own statements cannot
    see the outbox rows before the commit, and the block owns the transaction —
    it commits when the block exits and rolls back when the block raises; call
    neither ``commit()`` nor ``rollback()`` on the connection inside it
    (savepoints, ``begin_nested()``, work as usual). On SQLite this is
    ``database.transaction()`` with :func:`add` writing at once.
    """
    if not database.is_postgres:
        async with database.transaction() as conn:
            yield conn
        return
    engine = _AUTOCOMMIT.get(database) or _autocommit_engine(database)
    with translate_errors("outbox transaction"):
        async with engine.connect() as conn:
            sync = conn.sync_connection
            assert sync is not None  # an open connection
            # Checked out just now, so no I/O is needed to reach the driver.
            driver: Any = sync.connection.driver_connection
            rows: list[dict[str, Any]] = []
            _DEFERRED[sync] = rows
            try:
                await driver.execute("BEGIN")
                # SQLAlchemy's side of it, so that sessions bound to the connection
                # join it and commit events fire; it sends nothing.
                await conn.begin()
                yield conn
                await driver.execute(_commit_statements(rows))
            except BaseException:
                await _abandon(conn, driver)
                raise
            finally:
                del _DEFERRED[sync]
            # SQLAlchemy's own bookkeeping (and on_commit callbacks): with the
            # driver in autocommit it sends nothing.
            await conn.commit()


def _autocommit_engine(database: Database) -> AsyncEngine:
    engine = database.engine.execution_options(isolation_level="AUTOCOMMIT")
    event.listen(engine.sync_engine, "commit", _owned_by_the_block)
    event.listen(engine.sync_engine, "rollback", _owned_by_the_block)
    _AUTOCOMMIT[database] = engine
    return engine


def _owned_by_the_block(conn: Connection) -> None:
    if conn not in _DEFERRED:
        return  # the block has ended: this is its own commit, or the pool's reset
    raise ConfigurationError(
        "outbox.transaction() commits when its block exits and rolls back when it "
        "raises: do not call commit() or rollback() on its connection inside the "
        "block (use begin_nested() for a part that may roll back alone)"
    )


async def _abandon(conn: AsyncConnection, driver: Any) -> None:
    """Roll back what the block began; a connection whose state is not known (the
    block was cancelled mid-statement, ROLLBACK failed) is closed instead of going
    back to the pool inside a transaction."""
    try:
        if driver.is_in_transaction():
            await driver.execute("ROLLBACK")
    except BaseException:
        await conn.invalidate()
        return
    if driver.is_in_transaction():
        await conn.invalidate()


def _commit_statements(rows: list[dict[str, Any]]) -> str:
    """``COMMIT``, preceded by the rows' ``INSERT`` and the relays' ``NOTIFY``: one
    simple-protocol message, so the rows go with the commit (statements with
    parameters cannot share a message; the values are quoted literals)."""
    if not rows:
        return "COMMIT"
    values = []
    for row in rows:
        row_id, event_type, key, payload, headers = driver_row(row)
        at = row["created_at"].isoformat()
        values.append(
            f"('{row_id}'::uuid,{_literal(event_type)},{_literal(key)},{_literal(payload)}"
            f"::jsonb,{_literal(headers)}::jsonb,'PENDING',0,'{at}'::timestamptz,"
            f"'{at}'::timestamptz)"
        )
    return (
        "INSERT INTO accord_outbox (id, event_type, key, payload, headers, status, "
        f"retry_count, available_at, created_at) VALUES {','.join(values)} "
        f"ON CONFLICT (id) DO NOTHING; NOTIFY {NOTIFY_CHANNEL}; COMMIT"
    )


def _literal(text: str | None) -> str:
    """An escape-string literal (``E'…'``): its backslashes and quotes are escaped
    whatever the server's ``standard_conforming_strings``."""
    if text is None:
        return "NULL"
    if "\x00" in text:
        raise ConfigurationError(f"an outbox value cannot hold a NUL character: {text[:80]!r}")
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
