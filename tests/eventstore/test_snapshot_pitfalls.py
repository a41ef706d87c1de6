"""Snapshots the Repository must not trust: one at a version its stream does not
have, and (PostgreSQL) one whose dicts JSONB would give back in another order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from accord.db import Database
from accord.eventstore import EventStore, Repository, Snapshot, retry_on_conflict

from .test_aggregate_pitfalls import Joined, Table


@pytest.fixture
async def store(database: Database) -> AsyncIterator[EventStore]:
    store = EventStore(database)
    yield store
    await store.close()


async def test_a_snapshot_beyond_the_stream_is_not_used(store: EventStore) -> None:
    """A snapshot at a version the stream does not have (its events deleted, or one
    taken of an aggregate whose save was rolled back) gave players that never joined
    and a version every save then conflicted with, retries or not."""
    repo = Repository(store, Table)
    table = repo.create("table-ahead")
    table.record(Joined(player="ann"))
    await repo.save(table)
    await store.save_snapshot(
        Snapshot(
            "table-ahead",
            "Table",
            5,
            1,
            {"seats": {"ann": 1, "ghost": 2}, "notes": []},
            datetime.now(UTC),
        )
    )
    loaded = await repo.load("table-ahead")
    assert loaded.seats == {"ann": 1} and loaded.version == 1

    async def join() -> None:
        again = await repo.load("table-ahead")
        again.record(Joined(player="bob"))
        await repo.save(again)

    await retry_on_conflict(join, attempts=2)
    assert (await repo.load("table-ahead")).seats == {"ann": 1, "bob": 2}
    assert (await repo.load("table-ahead", version=1)).seats == {"ann": 1}


async def test_a_snapshot_keeps_the_order_of_the_state(store: EventStore) -> None:
    """PostgreSQL's JSONB sorts an object's keys (shortest first): players loaded
    through a snapshot came back in another order than they joined, on PostgreSQL
    only."""
    repo = Repository(store, Table)
    table = repo.create("table-order")
    for player in ("zoe", "alexandra", "bo"):
        table.record(Joined(player=player))
    await repo.save(table)
    assert (await store.load_snapshot("table-order")) is not None
    loaded = await repo.load("table-order")
    assert list(loaded.seats.items()) == [("zoe", 1), ("alexandra", 2), ("bo", 3)]
