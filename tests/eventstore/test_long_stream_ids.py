"""Stream ids up to the 300 characters the store holds go through the outbox (whose
ordering key holds 200); a longer one is refused by name on both databases."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from accord.db import Database
from accord.db.schema import outbox
from accord.errors import ConfigurationError
from accord.eventstore import EventStore, NewEvent, message_key
from accord.messages import MAX_NAME_LENGTH


@pytest.fixture
async def store(database: Database) -> AsyncIterator[EventStore]:
    await database.upgrade()
    store = EventStore(database)
    yield store
    await store.close()


async def outbox_rows(database: Database, subject_prefix: str) -> list[tuple[str, str, str]]:
    """(key, subject, event id) of the outbox rows whose subject starts so, in seq order."""
    async with database.connect() as conn:
        rows = (await conn.execute(sa.select(outbox).order_by(outbox.c.seq))).all()
    return [
        (r.key, r.headers.get("ce-subject", ""), str(r.id))
        for r in rows
        if r.headers.get("ce-subject", "").startswith(subject_prefix)
    ]


async def test_a_300_character_stream_goes_through_the_outbox_under_one_key_of_its_own(
    database: Database, store: EventStore
) -> None:
    shared = "tournament/" + "x" * 240  # two streams alike in their first 251 characters
    first, second = shared + "a" * 49, shared + "b" * 49
    assert len(first) == len(second) == 300
    for stream in (first, second, first):
        await store.append(stream, [NewEvent("t.Happened", {})], outbox=True)
    rows = await outbox_rows(database, shared)
    keys = [key for key, _, _ in rows]
    assert keys[0] == keys[2] != keys[1]  # one key per stream, never shared
    assert all(len(key) <= MAX_NAME_LENGTH and key.startswith("tournament/xxx") for key in keys)
    assert [subject for _, subject, _ in rows] == [first, second, first]
    assert keys[0] == message_key(first) and keys[1] == message_key(second)
    stored = [str(e.id) for e in await store.read_stream(first)]
    assert [event_id for _, subject, event_id in rows if subject == first] == stored


async def test_a_stream_id_a_key_holds_is_its_own_key(
    database: Database, store: EventStore
) -> None:
    stream = "s" * MAX_NAME_LENGTH
    await store.append(stream, [NewEvent("t.Happened", {})], outbox=True)
    assert [key for key, _, _ in await outbox_rows(database, stream)] == [stream]
    assert message_key(stream) == stream


async def test_a_stream_id_longer_than_the_store_holds_is_refused_on_both_databases(
    database: Database, store: EventStore
) -> None:
    """PostgreSQL refused it with a driver error, SQLite stored it: now neither."""
    with pytest.raises(ConfigurationError, match="stream_id is 301 characters long"):
        await store.append("x" * 301, [NewEvent("t.Happened", {})])
    assert await store.read_stream("x" * 301) == []
