"""A message whose data is a bare JSON number. SQLite gives a column declared JSON
NUMERIC affinity, so ``5`` or ``2.5`` is stored as a number, not as JSON text; the
relay then failed every round on that row, and nothing else was published either."""

from __future__ import annotations

from typing import Any

from accord import Database, Message, add_to_outbox
from accord.outbox import OutboxAdmin
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
