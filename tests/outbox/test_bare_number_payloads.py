"""A message whose data is a bare JSON number. SQLite gives a column declared JSON
NUMERIC affinity, so ``5`` or ``2.5`` is stored as a number, not as JSON text; the
relay then failed every round on that row, and nothing else was published either."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from accord import Database, Message, add_to_outbox
from accord.outbox import OutboxAdmin
from accord.outbox._claim import claim
from tests.outbox.conftest import fast_relay

VALUES = [5, 0, -12, 2.5, 0.30000000000000004, True, None, "7", [1, 2]]


async def test_the_relay_publishes_bare_numbers_exactly(
    database: Database, db_url: str, listen: Any
) -> None:
    transport, received = await listen(db_url)
    messages = [Message(type="number.given", data=value) for value in VALUES]
    async with database.transaction() as conn:
        await add_to_outbox(conn, *messages)
    relay = fast_relay(database, transport)
    assert await relay.run_once() == len(messages)
    await received.wait(len(messages), timeout=10)
    data = {m.id: m.data for m, _ in received.received if m is not None}
    for message, value in zip(messages, VALUES, strict=True):
        assert data[message.id] == value and type(data[message.id]) is type(value)


async def test_outbox_show_reads_a_bare_number(database: Database) -> None:
    messages = [Message(type="number.given", data=value) for value in (5, 2.5)]
    async with database.transaction() as conn:
        await add_to_outbox(conn, *messages)
    admin = OutboxAdmin(database)
    assert [(await admin.show(m.id))["payload"] for m in messages] == [5, 2.5]


@pytest.mark.parametrize(
    "value",
    [2.0, 2**64, 10**400],
    ids=["integral-float", "int-past-64-bits", "huge-int"],
)
async def test_a_bare_number_is_claimed_as_the_json_it_was(database: Database, value: Any) -> None:
    """Stored as text that reads as a number, SQLite's NUMERIC affinity changed it:
    ``2.0`` became the integer 2 (a float arrived as an int), an integer past 64 bits
    a REAL (``2**64`` published ``1.8446744073709552e+19``), one past a double's range
    infinity (published ``Infinity``, not JSON). PostgreSQL (jsonb numeric) publishes
    them as the writer encoded them."""
    message = Message(type="number.given", data=value)
    async with database.transaction() as conn:
        await add_to_outbox(conn, message)
    now = datetime.now(UTC)
    async with database.transaction() as conn:
        [row] = await claim(conn, now=now, lease_until=now + timedelta(seconds=30), limit=10)
    assert row.payload == json.dumps(value).encode()


async def test_a_bare_number_written_before_the_fix_is_claimed_too(database: Database) -> None:
    """Rows an earlier version stored on SQLite hold the number itself."""
    message = Message(type="number.given", data=1)
    async with database.transaction() as conn:
        await add_to_outbox(conn, message)
        cast = "CAST(:p AS JSONB)" if database.is_postgres else ":p"
        await conn.execute(sa.text(f"UPDATE accord_outbox SET payload = {cast}"), {"p": "7.5"})
    now = datetime.now(UTC)
    async with database.transaction() as conn:
        [row] = await claim(conn, now=now, lease_until=now + timedelta(seconds=30), limit=10)
    assert row.payload == b"7.5"
    assert (await OutboxAdmin(database).show(message.id))["payload"] == 7.5
