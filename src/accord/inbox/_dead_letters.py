"""Consumer dead letters: what a consumer gave up on, why, and how to replay it.

A dead letter is a row of ``accord_dead_letters`` in the *consumer's* database,
holding the delivery exactly as it arrived (headers and body) and a reason.
Replaying marks the row ``REPLAY``; the running :class:`~accord.inbox.Consumer`
of that name picks it up and dispatches it through its normal path with the
attempts reset, whatever the transport. A replayed message that is handled
disappears from the table; one that fails again is ``DEAD`` again, with the new
reason.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord._checks import MAX_BIGINT, checked_limit
from accord.db import Database
from accord.db.database import translate_errors
from accord.db.schema import dead_letters
from accord.errors import ConfigurationError, NotFoundError
from accord.messages import MAX_NAME_LENGTH
from accord.transports.base import Delivery

__all__ = ["DEAD", "KINDS", "REPLAY", "DeadLetter", "DeadLetters"]

DEAD = "DEAD"
REPLAY = "REPLAY"
#: Why a message was dead-lettered.
KINDS = ("undecodable", "unknown_type", "invalid_data", "handler_failed", "delivery_limit")


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter: the delivery as it arrived, and why the consumer gave up."""

    id: int
    consumer: str
    message_id: str | None
    message_type: str | None
    kind: str
    reason: str
    attempts: int
    status: str
    created_at: datetime
    updated_at: datetime | None
    headers: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)

    @property
    def summary(self) -> str:
        """The first line of the reason."""
        return self.reason.splitlines()[0] if self.reason else ""

    def body_text(self) -> str:
        """The body as text (JSON pretty-printed when it is JSON; escaped when binary)."""
        try:
            text = self.body.decode()
        except UnicodeDecodeError:
            return repr(self.body)
        try:
            return json.dumps(json.loads(text), indent=2)
        except ValueError:
            return text

    def to_dict(self, *, full: bool = False) -> dict[str, Any]:
        """A JSON-ready view; ``full`` adds the headers, the body and the whole reason."""
        view: dict[str, Any] = {
            "id": self.id,
            "consumer": self.consumer,
            "message_id": self.message_id,
            "message_type": self.message_type,
            "kind": self.kind,
            "reason": self.reason if full else self.summary,
            "attempts": self.attempts,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }
        if full:
            view["headers"] = self.headers
            view["body"] = self.body_text()
        return view


def _from_row(row: Any) -> DeadLetter:
    return DeadLetter(
        id=int(row.id),
        consumer=row.consumer,
        message_id=row.message_id,
        message_type=row.message_type,
        kind=row.kind,
        reason=row.reason,
        attempts=int(row.attempts),
        status=row.status,
        created_at=row.created_at,
        updated_at=row.updated_at,
        headers=dict(row.headers or {}),
        body=bytes(row.body),
    )


async def write_dead_letter(
    conn: AsyncConnection,
    *,
    consumer: str,
    delivery: Delivery,
    kind: str,
    reason: str,
    attempts: int | None = None,
) -> None:
    """Record ``delivery`` as dead for ``consumer`` in ``conn``'s transaction, after
    ``attempts`` tries (default: the delivery's attempt).

    A replayed delivery updates its own row back to DEAD. A message already dead
    for this consumer (redelivered after a crash between this write and the ack)
    updates that row instead of adding a second one.
    """
    now = datetime.now(UTC)
    message = delivery.message
    message_id = message.id if message else _header(delivery, "ce-id")
    changes = {
        "kind": kind,
        "reason": _storable(reason, None),
        "attempts": delivery.attempt if attempts is None else attempts,
        "status": DEAD,
        "available_at": None,
        "updated_at": now,
    }
    existing: int | None = getattr(delivery, "dead_letter_id", None)
    if existing is None and message_id is not None:
        existing = await conn.scalar(
            sa.select(dead_letters.c.id)
            .where(
                dead_letters.c.consumer == consumer,
                dead_letters.c.message_id == message_id,
                dead_letters.c.status == DEAD,
            )
            .limit(1)
        )
    if existing is not None:
        await conn.execute(
            dead_letters.update().where(dead_letters.c.id == existing).values(**changes)
        )
        return
    await conn.execute(
        dead_letters.insert().values(
            consumer=consumer,
            message_id=message_id,
            message_type=message.type if message else _header(delivery, "ce-type"),
            headers={_storable(k, None): _storable(v, None) for k, v in delivery.headers.items()},
            body=delivery.body,
            created_at=now,
            **changes,
        )
    )


def _storable(text: str, limit: int | None = MAX_NAME_LENGTH) -> str:
    """``text`` as a column can hold it: PostgreSQL text and JSONB refuse NUL, and
    the id and type columns are ``MAX_NAME_LENGTH`` wide. What is kept of bad input
    must fit, or its dead letter could never be written."""
    text = text.replace("\x00", "\ufffd")
    return text if limit is None else text[:limit]


def _header(delivery: Delivery, name: str) -> str | None:
    value = delivery.headers.get(name)
    return None if value is None else _storable(value)


class ReplayDelivery(Delivery):
    """A dead letter marked for replay, delivered again to its consumer.

    Settling it updates the dead-letter row: ack deletes it, nack schedules the
    next attempt (``available_at``), reject makes it DEAD again.
    """

    def __init__(self, database: Database, letter: DeadLetter) -> None:
        super().__init__(letter.headers, letter.body, letter.attempts + 1)
        self.database = database
        self.dead_letter_id = letter.id

    async def _ack(self) -> None:
        # Only a row still in REPLAY: if the consumer dead-lettered it again, keep it.
        async with self.database.transaction() as conn:
            await conn.execute(
                dead_letters.delete().where(
                    dead_letters.c.id == self.dead_letter_id, dead_letters.c.status == REPLAY
                )
            )

    async def _nack(self, delay: float) -> None:
        now = self.database.clock.now()
        async with self.database.transaction() as conn:
            await conn.execute(
                dead_letters.update()
                .where(dead_letters.c.id == self.dead_letter_id, dead_letters.c.status == REPLAY)
                .values(
                    attempts=self.attempt,
                    available_at=now + timedelta(seconds=delay),
                    updated_at=now,
                )
            )

    async def _reject(self, reason: str) -> None:
        now = self.database.clock.now()
        async with self.database.transaction() as conn:
            await conn.execute(
                dead_letters.update()
                .where(dead_letters.c.id == self.dead_letter_id)
                .values(status=DEAD, reason=reason, available_at=None, updated_at=now)
            )


async def claim_replays(
    database: Database, consumer: str, *, limit: int, lease: float
) -> list[DeadLetter]:
    """Take up to ``limit`` due REPLAY rows of ``consumer`` for ``lease`` seconds.

    The conditional update is the claim: of two processes of one consumer only one
    takes a row; if the taker dies, the row is due again when the lease ends. Times
    are the database server's (:class:`~accord.db.ServerClock`), as the operator's
    replay wrote them, so hosts whose clocks differ neither wait for nor cut short
    each other's leases.
    """
    await database.clock.sync_if_due()
    now = database.clock.now()
    due = (
        sa.select(dead_letters)
        .where(
            dead_letters.c.status == REPLAY,
            dead_letters.c.consumer == consumer,
            dead_letters.c.available_at <= now,
        )
        .order_by(dead_letters.c.id)
        .limit(limit)
    )
    claimed: list[DeadLetter] = []
    async with database.transaction() as conn:
        for row in (await conn.execute(due)).all():
            taken = await conn.execute(
                dead_letters.update()
                .where(
                    dead_letters.c.id == row.id,
                    dead_letters.c.status == REPLAY,
                    dead_letters.c.available_at <= now,
                )
                .values(available_at=now + timedelta(seconds=lease))
            )
            if taken.rowcount == 1:
                claimed.append(_from_row(row))
    return claimed


async def release_replays(database: Database, ids: Sequence[int]) -> None:
    """Make claimed REPLAY rows due again now (a stopping consumer did not get to
    them), instead of when their lease ends."""
    if not ids:
        return
    async with database.transaction() as conn:
        await conn.execute(
            dead_letters.update()
            .where(dead_letters.c.id.in_(list(ids)), dead_letters.c.status == REPLAY)
            .values(available_at=database.clock.now())
        )


def _not_found(letter_id: int) -> NotFoundError:
    return NotFoundError(
        f"no dead letter with id {letter_id}: see `accord inbox dead list` for the ids"
    )


def _can_exist(letter_id: int) -> bool:
    """Whether a dead letter could have this id: one past BIGINT is not just absent, the
    drivers refuse it (asyncpg's DataError, SQLite's OverflowError)."""
    return 0 <= letter_id <= MAX_BIGINT


class DeadLetters:
    """Operate on the dead letters of every consumer that uses ``database``."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def list(
        self, consumer: str | None = None, *, status: str | None = None, limit: int = 100
    ) -> Sequence[DeadLetter]:
        """Dead letters, oldest first, optionally of one consumer / in one status; at
        most ``limit`` (at least 1)."""
        query = sa.select(dead_letters).order_by(dead_letters.c.id).limit(checked_limit(limit))
        if consumer is not None:
            query = query.where(dead_letters.c.consumer == consumer)
        if status is not None:
            query = query.where(dead_letters.c.status == status.upper())
        with translate_errors("listing dead letters"):
            async with self.database.read() as conn:
                return [_from_row(row) for row in (await conn.execute(query)).all()]

    async def get(self, letter_id: int) -> DeadLetter:
        """One dead letter; :class:`~accord.errors.NotFoundError` if there is none."""
        if not _can_exist(letter_id):
            raise _not_found(letter_id)
        with translate_errors("reading a dead letter"):
            async with self.database.read() as conn:
                row = (
                    await conn.execute(
                        sa.select(dead_letters).where(dead_letters.c.id == letter_id)
                    )
                ).first()
        if row is None:
            raise _not_found(letter_id)
        return _from_row(row)

    async def replay(self, letter_id: int, *, consumer: str | None = None) -> DeadLetter:
        """Mark a dead letter for replay with its attempts reset; its consumer, when
        running, delivers it to the handler again within its replay interval.
        Returns the letter as marked: a running consumer may take it (and, handled,
        delete it) as soon as the mark commits. With ``consumer``, a letter of another
        consumer is refused (ConfigurationError) and left as it is."""
        if not _can_exist(letter_id):
            raise _not_found(letter_id)
        statement = dead_letters.update().where(dead_letters.c.id == letter_id)
        if consumer is not None:
            statement = statement.where(dead_letters.c.consumer == consumer)
        with translate_errors("replaying a dead letter"):
            async with self.database.transaction() as conn:
                row = (
                    await conn.execute(
                        statement.values(status=REPLAY, attempts=0, **self._due_now()).returning(
                            *dead_letters.c
                        )
                    )
                ).first()
        if row is None:
            letter = await self.get(letter_id)  # NotFoundError if there is none
            raise ConfigurationError(
                f"dead letter {letter_id} not replayed: it belongs to consumer "
                f"{letter.consumer!r}, not to {consumer!r}"
            )
        return _from_row(row)

    async def replay_all(self, consumer: str | None = None) -> int:
        """Mark every DEAD letter (of one consumer, or all) for replay; return how many."""
        statement = (
            dead_letters.update()
            .where(dead_letters.c.status == DEAD)
            .values(status=REPLAY, attempts=0, **self._due_now())
        )
        if consumer is not None:
            statement = statement.where(dead_letters.c.consumer == consumer)
        with translate_errors("replaying dead letters"):
            async with self.database.transaction() as conn:
                return int((await conn.execute(statement)).rowcount)

    def _due_now(self) -> dict[str, Any]:
        # The server's time on PostgreSQL, as consumers compare it (Database.clock):
        # an operator's host ahead of the consumers' must not hold the replay back.
        now = self.database.clock.sql_now()
        return {"available_at": now, "updated_at": now}

    async def purge(self, consumer: str | None = None, *, letter_id: int | None = None) -> int:
        """Delete DEAD letters (one, those of one consumer, or all); return how many.
        Letters waiting for replay are kept."""
        if letter_id is not None and not _can_exist(letter_id):
            return 0  # no such letter
        statement = dead_letters.delete().where(dead_letters.c.status == DEAD)
        if consumer is not None:
            statement = statement.where(dead_letters.c.consumer == consumer)
        if letter_id is not None:
            statement = statement.where(dead_letters.c.id == letter_id)
        with translate_errors("purging dead letters"):
            async with self.database.transaction() as conn:
                return int((await conn.execute(statement)).rowcount)

    async def count(self) -> dict[str, dict[str, int]]:
        """Number of dead letters per consumer and status."""
        query = sa.select(dead_letters.c.consumer, dead_letters.c.status, sa.func.count()).group_by(
            dead_letters.c.consumer, dead_letters.c.status
        )
        counts: dict[str, dict[str, int]] = {}
        with translate_errors("counting dead letters"):
            async with self.database.read() as conn:
                for consumer, status, n in (await conn.execute(query)).all():
                    counts.setdefault(consumer, {})[status] = int(n)
        return counts
