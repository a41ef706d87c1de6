"""Adding messages to the outbox inside the caller's own transaction."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from accord.db.database import translate_errors
from accord.db.schema import outbox
from accord.errors import ConfigurationError
from accord.messages import Message, decode, encode

__all__ = ["NOTIFY_CHANNEL", "add", "message_from_row", "row_from_message"]

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


async def add(conn: AsyncConnection | AsyncSession, *messages: Message) -> None:
    """Write ``messages`` to the outbox in the transaction ``conn`` is in.

    Nothing is published unless that transaction commits; once it commits, the
    relay publishes each message at least once, with its id unchanged.
    Messages with the same ``key`` are published in the order they were added.
    """
    if not messages:
        return
    connection = await conn.connection() if isinstance(conn, AsyncSession) else conn
    now = datetime.now(UTC)
    rows = [row_from_message(m, now) for m in messages]
    with translate_errors("adding to the outbox"):
        await connection.execute(outbox.insert(), rows)
        if connection.dialect.name == "postgresql":
            # Delivered at commit, and only if the transaction commits; identical
            # notifications in one transaction are folded into one.
            await connection.execute(sa.text(f"NOTIFY {NOTIFY_CHANNEL}"))
