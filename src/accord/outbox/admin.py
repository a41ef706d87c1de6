"""Looking into the outbox and acting on dead letters: status, list, show, replay, purge."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord._checks import checked_limit
from accord.db.database import Database
from accord.db.schema import outbox
from accord.errors import ConfigurationError, NotFoundError
from accord.outbox.writer import (
    SCHEDULED,
    announce_pending,
    message_uuid,
    withdraw_scheduled,
)

__all__ = ["OutboxAdmin", "OutboxStatus"]


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """Counts per status, and how far behind the relay is."""

    pending: int
    sent: int
    dead: int
    retrying: int
    oldest_pending_at: datetime | None
    #: When the counts were read, in the database server's time (rows' times are too).
    as_of: datetime | None = None
    #: Messages added for later (``deliver_at`` / ``delay``), not yet due or released.
    scheduled: int = 0
    #: When the first of them falls due.
    next_scheduled_at: datetime | None = None

    @property
    def oldest_pending_age(self) -> float | None:
        """Seconds since the oldest PENDING row was committed, or None."""
        if self.oldest_pending_at is None:
            return None
        as_of = self.as_of or datetime.now(UTC)
        return (as_of - self.oldest_pending_at).total_seconds()

    def as_dict(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "sent": self.sent,
            "dead": self.dead,
            "retrying": self.retrying,
            "oldest_pending_at": self.oldest_pending_at,
            "oldest_pending_age_seconds": self.oldest_pending_age,
            "scheduled": self.scheduled,
            "next_scheduled_at": self.next_scheduled_at,
        }


#: The columns listed (dead, scheduled): all but the payload and headers, which a
#: list does not show and which need not even be JSON (SQLite keeps what is written
#: by hand).
_LISTED = [c for c in outbox.c if c.name not in ("payload", "headers")]


def _stored_json(text: str | None) -> Any:
    """A JSON column read as text: the JSON it holds, or, if it holds something else
    (not JSON, or a NaN no JSON reader takes back), that text as it is."""
    if text is None:
        return None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _ids(message_ids: Sequence[str]) -> Sequence[str]:
    if isinstance(message_ids, str):
        raise ConfigurationError(
            f"give the message ids as a list, e.g. [{message_ids!r}], not as one string"
        )
    return message_ids


def _row_dict(row: Any, with_payload: bool = False) -> dict[str, Any]:
    data = {
        "id": str(row.id),
        "seq": row.seq,
        "event_type": row.event_type,
        "key": row.key,
        "status": row.status,
        "retry_count": row.retry_count,
        "last_error": row.last_error,
        "created_at": row.created_at,
        "available_at": row.available_at,
        "sent_at": row.sent_at,
    }
    if with_payload:
        data["payload"] = _stored_json(row.payload)
        data["headers"] = _stored_json(row.headers)
    return data


def _aware(value: datetime | str | None) -> datetime | None:
    if isinstance(value, str):  # SQLite aggregate bypasses the column type
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    return value


class OutboxAdmin:
    """Operator actions on one database's outbox."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def status(self) -> OutboxStatus:
        """How many rows are PENDING (and of those, retrying), SENT and DEAD."""
        query = sa.select(
            sa.func.count().filter(outbox.c.status == "PENDING"),
            sa.func.count().filter(outbox.c.status == "SENT"),
            sa.func.count().filter(outbox.c.status == "DEAD"),
            sa.func.count().filter(outbox.c.status == "PENDING", outbox.c.retry_count > 0),
            sa.func.min(outbox.c.created_at).filter(outbox.c.status == "PENDING"),
            sa.func.count().filter(outbox.c.status == SCHEDULED),
            sa.func.min(outbox.c.available_at).filter(outbox.c.status == SCHEDULED),
        )
        await self.database.clock.sync_if_due()
        async with self.database.read() as conn:
            row = (await conn.execute(query)).one()
        pending, sent, dead, retrying, oldest, scheduled, next_scheduled = row
        as_of = self.database.clock.now()
        return OutboxStatus(
            pending,
            sent,
            dead,
            retrying,
            _aware(oldest),
            as_of,
            scheduled,
            _aware(next_scheduled),
        )

    async def dead(
        self, *, limit: int = 100, event_type: str | None = None
    ) -> list[dict[str, Any]]:
        """DEAD rows, oldest first; at most ``limit`` (at least 1)."""
        limit = checked_limit(limit)
        query = sa.select(*_LISTED).where(outbox.c.status == "DEAD").order_by(outbox.c.seq)
        if event_type:
            query = query.where(outbox.c.event_type == event_type)
        async with self.database.read() as conn:
            rows = (await conn.execute(query.limit(limit))).all()
        return [_row_dict(r) for r in rows]

    async def scheduled(
        self, *, limit: int = 100, event_type: str | None = None
    ) -> list[dict[str, Any]]:
        """Messages scheduled for later and not yet released, next due first (their
        ``available_at`` is when they fall due); at most ``limit`` (at least 1)."""
        limit = checked_limit(limit)
        query = (
            sa.select(*_LISTED)
            .where(outbox.c.status == SCHEDULED)
            .order_by(outbox.c.available_at, outbox.c.seq)
        )
        if event_type:
            query = query.where(outbox.c.event_type == event_type)
        async with self.database.read() as conn:
            rows = (await conn.execute(query.limit(limit))).all()
        return [_row_dict(r) for r in rows]

    async def cancel(self, message_ids: Sequence[str]) -> int:
        """Withdraw scheduled messages not yet released; returns how many were."""
        if not _ids(message_ids):
            raise ConfigurationError("give the ids of the scheduled messages to cancel")
        async with self.database.transaction() as conn:
            return await withdraw_scheduled(conn, message_ids)

    async def show(self, message_id: str) -> dict[str, Any]:
        """One outbox row, with its payload and headers (as the text stored, if that is
        not JSON)."""
        # Read as text, so that a row whose JSON was spoilt by hand can be looked at.
        query = sa.select(
            *_LISTED,
            sa.cast(outbox.c.payload, sa.Text).label("payload"),
            sa.cast(outbox.c.headers, sa.Text).label("headers"),
        ).where(outbox.c.id == message_uuid(message_id))
        async with self.database.read() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFoundError(f"no outbox message with id {message_id}")
        return _row_dict(row, with_payload=True)

    async def replay(self, message_ids: Sequence[str] = (), *, all_dead: bool = False) -> int:
        """Put DEAD messages back to PENDING with attempts reset; returns how many.

        Named ids are all replayed or none: :class:`~accord.errors.NotFoundError`
        names those that are not DEAD messages (unknown, or already replayed)."""
        where = self._dead_selection(message_ids, all_dead)
        values = {
            "status": "PENDING",
            "retry_count": 0,
            # The server's time on PostgreSQL, as relays compare it (Database.clock).
            "available_at": self.database.clock.sql_now(),
        }
        async with self.database.transaction() as conn:
            await _all_dead(conn, message_ids, "replayed")
            result = await conn.execute(outbox.update().where(where).values(**values))
            if result.rowcount:
                await announce_pending(conn)
        return result.rowcount or 0

    async def purge(self, message_ids: Sequence[str] = (), *, all_dead: bool = False) -> int:
        """Delete DEAD messages for good; returns how many. Named ids are all purged or
        none, as in :meth:`replay`."""
        where = self._dead_selection(message_ids, all_dead)
        async with self.database.transaction() as conn:
            await _all_dead(conn, message_ids, "purged")
            result = await conn.execute(outbox.delete().where(where))
        return result.rowcount or 0

    def _dead_selection(self, message_ids: Sequence[str], all_dead: bool) -> Any:
        if not _ids(message_ids) and not all_dead:
            raise ConfigurationError("name the message ids, or pass --all for every DEAD message")
        if message_ids and all_dead:
            raise ConfigurationError(
                "name the message ids or pass --all for every DEAD message, not both"
            )
        where = outbox.c.status == "DEAD"
        if message_ids:
            where = sa.and_(where, outbox.c.id.in_([message_uuid(m) for m in message_ids]))
        return where


async def _all_dead(conn: AsyncConnection, message_ids: Sequence[str], done: str) -> None:
    """Raise NotFoundError naming the ``message_ids`` that are not DEAD messages."""
    if not message_ids:
        return
    wanted = [message_uuid(m) for m in message_ids]
    found = set(
        await conn.scalars(
            sa.select(outbox.c.id).where(outbox.c.status == "DEAD", outbox.c.id.in_(wanted))
        )
    )
    missing = [m for m, id in zip(message_ids, wanted, strict=True) if id not in found]
    if missing:
        raise NotFoundError(
            f"no DEAD outbox message with id {', '.join(missing)} (unknown, or not DEAD: "
            f"see `accord outbox dead list`); nothing was {done}"
        )
