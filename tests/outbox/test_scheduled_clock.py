"""When a message scheduled with ``delay`` falls due on PostgreSQL: ``delay`` after it
was added, by the server's clock, whatever the session's time zone and however long
its transaction ran before."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from accord import Database, Message, add_to_outbox
from accord.outbox import SCHEDULED
from tests.outbox.test_scheduled import WAYS, adding, row_of


def days_across_a_clock_change(zone: ZoneInfo, now: datetime) -> int:
    """The fewest whole days from ``now`` after which ``zone``'s UTC offset differs."""
    here = now.astimezone(zone).utcoffset()
    return next(
        n for n in range(1, 400) if (now + timedelta(days=n)).astimezone(zone).utcoffset() != here
    )


@pytest.mark.postgres
@pytest.mark.parametrize("way", ["transaction", "session", "no_transaction_yet"])
async def test_a_delay_of_whole_days_is_exact_whatever_the_servers_time_zone(
    pg_url: str, way: str
) -> None:
    """``timedelta(days=n)`` is n * 24 hours. Sent to PostgreSQL as an ``interval``,
    asyncpg puts whole days in its *days* field, and ``timestamptz + '1 day'`` adds a
    calendar day in the session's TimeZone: 23 or 25 hours across a DST change, so
    the message falls due an hour early (or late). The literal path of
    outbox_transaction() sends seconds and is exact; SQLite adds in Python."""
    zone = "America/New_York"  # a server whose TimeZone has DST, as many are set
    async with Database(pg_url) as database, database.connect() as conn:
        name = await conn.scalar(sa.text("SELECT current_database()"))
        await conn.execute(sa.text(f"ALTER DATABASE \"{name}\" SET timezone TO '{zone}'"))
        await conn.commit()
    delay = timedelta(days=days_across_a_clock_change(ZoneInfo(zone), datetime.now(UTC)))
    message = Message(type="reminder.later")
    async with Database(pg_url) as zoned:
        if way == "no_transaction_yet":  # the SQLAlchemy path (no driver transaction yet)
            async with zoned.connect() as conn:
                await add_to_outbox(conn, message, delay=delay)
                await conn.commit()
        else:
            async with adding(zoned, way) as conn:
                await add_to_outbox(conn, message, delay=delay)
        row = await row_of(zoned, message.id)
    assert row.status == SCHEDULED
    # created_at is the transaction's start: allow for the moments until the add.
    after = row.available_at - row.created_at
    assert abs(after - delay) < timedelta(minutes=1), f"due {after} after it was added, not {delay}"


@pytest.mark.parametrize("way", WAYS)
async def test_a_delay_counts_from_when_the_message_is_added_not_from_the_transactions_start(
    database: Database, db_url: str, way: str
) -> None:
    """``delay`` is added to PostgreSQL's ``now()``, the time the *transaction* began:
    a transaction that works for a while before it adds a message with
    ``delay=timedelta(seconds=1)`` has it due before it is even committed, and a
    relay publishes it at once. SQLite counts from the add() call."""
    delay = timedelta(seconds=1)
    message = Message(type="reminder.later")
    async with adding(database, way) as conn:
        on = conn if isinstance(conn, AsyncConnection) else await conn.connection()
        await on.execute(sa.text("SELECT 1"))  # the transaction has begun
        await asyncio.sleep(1.5)  # ... and does some work
        if database.is_postgres:
            added = await on.scalar(sa.text("SELECT clock_timestamp()"))
        else:
            added = datetime.now(UTC)
        await add_to_outbox(conn, message, delay=delay)
    row = await row_of(database, message.id)
    assert row.status == SCHEDULED
    assert row.available_at >= added + delay, (
        f"due {row.available_at}, {added + delay - row.available_at} before "
        f"{delay} after it was added ({added})"
    )
