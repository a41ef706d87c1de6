"""Adding messages to the outbox inside the caller's own transaction."""

from __future__ import annotations

import functools
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from accord.db.database import driver_in_transaction, translate_errors
from accord.db.schema import outbox
from accord.errors import ConfigurationError
from accord.messages import Message, decode, encode

__all__ = ["NOTIFY_CHANNEL", "add", "driver_row", "message_from_row", "row_from_message"]

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
    headers, _body = encode(message)
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
        json.dumps(row["payload"], separators=(",", ":"), default=str),
        json.dumps(row["headers"], separators=(",", ":")),
    )


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
